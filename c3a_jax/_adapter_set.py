"""A layer holding a set of adapters (:func:`c3a_jax.stack_adapters`): ``(K, m, n, b)`` C3A
kernels, one slot per adapter, and ``intercept(adapter_index=...)`` naming each row's slot.

The words: a *set* of adapters is what ``stack_adapters`` builds; a *slot* is one adapter's
place on its leading axis. A *stack* is always a layer stack (``nn.scan`` / ``nnx.scan``),
whose axes come before the slot axis.

Read by :func:`c3a_jax._layer_call.apply` for every adapted layer: when a layer's C3A kernel
is a set, which row takes which adapter, and the check that the kernel fits the layer's
contraction.

Example:
  >>> import jax.numpy as jnp, c3a_jax as c3a
  >>> from c3a_jax import _adapter_set
  >>> _adapter_set.index_for("fc", jnp.ones((2, 2, 4))) is None      # one adapter
  True
  >>> with c3a.intercept(adapter_index=jnp.array([1, -1])):
  ...   _adapter_set.index_for("fc", jnp.ones((3, 2, 2, 4))).tolist()  # a set of 3
  [1, -1]
"""

from __future__ import annotations

from typing import Any

from c3a_jax import _context, _contraction, ops


def index_for(path: str, w: Any) -> Any:
  """The rows' adapter index if ``w`` holds a set of adapters (``(K, m, n, b)``, from
  :func:`c3a_jax.stack_adapters`) and the call says which row takes which; None for one
  adapter; a ValueError where the two disagree."""
  index = _context.adapter_index.get()
  if index is not None and w.ndim == 3:
    raise ValueError(
      f"intercept(adapter_index=...) is set, but layer {path!r} holds one adapter "
      f"{tuple(w.shape)}, not a set of them (c3a.stack_adapters)"
    )
  return index if w.ndim == 4 else None


def check_fits(path: str, w: Any, c: _contraction.Contraction, slots: bool) -> None:
  """A ValueError naming ``path`` unless ``w`` (one kernel, or a set with ``slots``) fits the
  contraction ``c``."""
  b = w.shape[-1]
  if w.shape[int(slots) :] == (c.d_out // b, c.d_in // b, b) and w.ndim == 3 + int(slots):
    return
  raise ValueError(
    f"layer {path!r} holds a C3A kernel of shape {w.shape}, but its call contracts a "
    f"kernel {c.shape} (d_in={c.d_in}, d_out={c.d_out}), which needs (d_out // b, d_in // b, b)"
    + (
      "; a stacked C3A kernel is sliced by the nn.scan / nn.vmap (or nnx.scan) that stacks its "
      "layer, and a set of adapters (c3a.stack_adapters, (K, m, n, b)) runs under "
      "c3a.intercept(adapter_index=...)"
      if w.ndim > 3 and not slots
      else ""
    )
  )


def mixed_rows(path: str, rows: Any, w: Any, index: Any) -> Any:
  """:func:`c3a_jax.ops.mixed_matmul` on a layer's rows, whose first axis is the batch's."""
  if rows.shape[0] != index.shape[0]:
    raise ValueError(
      f"layer {path!r}: intercept(adapter_index=...) names {index.shape[0]} rows, but the "
      f"layer's input has {rows.shape[0]} along its first axis (the batch axis must lead)"
    )
  return ops.mixed_matmul(rows, w, index)
