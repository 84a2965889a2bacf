"""Shardings for data-parallel and FSDP training over a ``jax.sharding.Mesh``.

The mesh has a ``"data"`` axis and optionally an ``"fsdp"`` axis; the batch is split over both.
The rule for parameters:

* C3A kernels ``(*stack, m, n, b)`` are sharded along their output-block axis ``m`` over
  ``"fsdp"`` where ``m`` divides evenly, else replicated (they are small; replication costs
  little).
* Base weights, with ``fsdp=True``, are sharded over ``"fsdp"`` along their largest axis that
  divides evenly, else replicated; with ``fsdp=False`` they are replicated.
* Optimizer state follows its parameters: a moment of a C3A kernel is placed like the kernel.

Example:
  >>> import jax, jax.numpy as jnp, c3a_jax as c3a
  >>> mesh = c3a.training.make_mesh()  # every device on the "data" axis
  >>> tree = {"fc": {"kernel": jnp.ones((8, 4)), "c3a_kernel": jnp.ones((2, 2, 4))}}
  >>> sorted(str(s.spec) for s in jax.tree.leaves(c3a.training.param_shardings(tree, mesh)))
  ['P()', 'P()']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from c3a_jax.tree import C3A_LEAVES, is_box, rebox, unbox

DATA, FSDP = "data", "fsdp"
AXES = (DATA, FSDP)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``(data, fsdp)`` mesh over ``devices`` (all devices, every host); ``-1`` takes the rest."""
  devices = list(jax.devices() if devices is None else devices)
  if data == -1:
    if fsdp <= 0 or len(devices) % fsdp:
      raise ValueError(f"make_mesh: fsdp={fsdp} does not divide the {len(devices)} devices")
    data = len(devices) // fsdp
  if data <= 0 or fsdp <= 0 or data * fsdp != len(devices):
    raise ValueError(
      f"make_mesh: data={data} x fsdp={fsdp} must equal the number of devices ({len(devices)})"
    )
  return Mesh(np.asarray(devices).reshape(data, fsdp), AXES)


def _check_mesh(mesh: Mesh) -> None:
  unknown = [a for a in mesh.axis_names if a not in AXES]
  if unknown:
    raise ValueError(
      f"mesh axes {unknown} are not known to c3a_jax's sharding rules; name the "
      f"axes from {AXES} (c3a.training.make_mesh builds such a mesh)"
    )


def spec_for(name: str, shape: tuple[int, ...], mesh: Mesh, *, fsdp: bool = True) -> P:
  """The rule above for one leaf, by its leaf name and shape."""
  _check_mesh(mesh)
  size = mesh.shape.get(FSDP, 1)
  if size == 1 or not shape:
    return P()
  if name in C3A_LEAVES:
    # (*stack, m, n, b): split the output blocks m, as each device then computes its own rows.
    if len(shape) < 3 or shape[-3] % size:
      return P()
    return P(*[None] * (len(shape) - 3), FSDP)
  if not fsdp:
    return P()
  divisible = [i for i in np.argsort(shape, kind="stable")[::-1] if shape[i] % size == 0]
  if not divisible:
    return P()
  spec = [None] * len(shape)
  spec[divisible[0]] = FSDP
  return P(*spec)


def _leaf_name(path: tuple[Any, ...]) -> str:
  keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  names = [k for k in keys if isinstance(k, str)]
  return names[-1] if names else ""


def param_shardings(tree: Any, mesh: Mesh, *, fsdp: bool = True) -> Any:
  """``NamedSharding`` for every array leaf of ``tree`` (params, an adapter, a TrainState, or
  optimizer state: a leaf is placed by its own name, so moments follow their parameters).
  A Flax box (``nn.Partitioned``) keeps its box, the sharding inside."""

  def place(path, x):
    sharding = NamedSharding(mesh, spec_for(_leaf_name(path), np.shape(unbox(x)), mesh, fsdp=fsdp))
    return rebox(x, sharding)

  return jax.tree_util.tree_map_with_path(place, tree, is_leaf=is_box)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The batch's leading axis split over every mesh axis (data and fsdp are both data-parallel)."""
  _check_mesh(mesh)
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Places a host-local batch on ``mesh``, split along its leading axis.

  On one host ``batch`` is the whole batch; on many (after ``jax.distributed.initialize``) each
  process passes its own slice, and the result is the global batch.
  """
  sharding = batch_sharding(mesh)
  local = jax.process_count() > 1
  n_shards = int(np.prod([mesh.shape[a] for a in mesh.axis_names]))
  per_process = n_shards // jax.process_count() if local else n_shards

  def place(path, x):
    x = np.asarray(x)
    if not x.ndim or x.shape[0] % per_process:
      where = jax.tree_util.keystr(path) or "batch"
      raise ValueError(
        f"batch leaf {where} has leading size {x.shape[0] if x.ndim else 'none (a scalar)'}, "
        f"which does not divide over the {per_process} "
        f"{'local ' if local else ''}shards of mesh axes {dict(mesh.shape)}"
      )
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree_util.tree_map_with_path(place, batch)
