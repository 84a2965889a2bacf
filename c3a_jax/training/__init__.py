"""Training C3A adapters: the step, its state, placement on meshes, checkpoints and counters.

As ``flax.training`` is to Flax: optional helpers over the adapter library. Everything here
works on the ``(adapter, base)`` split of :func:`c3a_jax.split` (or one tree with
:func:`c3a_jax.optimizer`), from one CPU to many hosts.

* :func:`make_train_step`, :class:`TrainState`, :func:`cast_frozen`: a pure, jittable step.
* :func:`make_mesh`, :func:`param_shardings`, :func:`batch_sharding`, :func:`shard_batch`:
  data-parallel and FSDP placement over a ``jax.sharding.Mesh``.
* :class:`Checkpointer`: orbax checkpoints of the state that resume exactly.
* :class:`Throughput`, :func:`compiled_memory`: tokens per second, XLA's memory estimate.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from c3a_jax import training
  >>> mesh = training.make_mesh()                     # every device on the "data" axis
  >>> adapter = {"fc": {"c3a_kernel": jnp.zeros((2, 2, 4))}}
  >>> state = training.TrainState.create(adapter, optax.adam(1e-1))
  >>> state = jax.device_put(state, training.param_shardings(state, mesh))
  >>> int(state.step), mesh.axis_names
  (0, ('data', 'fsdp'))
"""

from c3a_jax.training._checkpoint import Checkpointer, CorruptCheckpointError
from c3a_jax.training._counters import Throughput, compiled_memory
from c3a_jax.training._sharding import batch_sharding, make_mesh, param_shardings, shard_batch
from c3a_jax.training._step import TrainState, cast_frozen, make_train_step

__all__ = [
  "Checkpointer",
  "CorruptCheckpointError",
  "Throughput",
  "TrainState",
  "batch_sharding",
  "cast_frozen",
  "compiled_memory",
  "make_mesh",
  "make_train_step",
  "param_shardings",
  "shard_batch",
]
