"""The one place C3A meets a layer's call: :class:`LayerCall` and :func:`apply`.

Every adapted layer, whatever its framework, reaches the adapter through here: the linen
interceptor (``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``, transformers' ``FlaxConv1D``) and
NNX's adapted layers (``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``, Tunix's einsum
modules, registered classes) each describe their call as a :class:`LayerCall`, and
:func:`apply` returns its output with the C3A delta: added to the layer's own output, per row
for a stack of adapters, or folded into its kernel (``x @ (kernel + delta)``) where the layer's
product is exact enough to hold it (:func:`c3a_jax.ops.can_fold`) and not quantized
(:mod:`c3a_jax._qwix`). ``"auto"`` is resolved here, once per call, and the fold is decided
here alone.

Example:
  >>> import jax.numpy as jnp
  >>> from c3a_jax import _contraction
  >>> x, kernel, w = jnp.ones((2, 8)), jnp.zeros((8, 4)), jnp.ones((1, 2, 4))
  >>> c = _contraction.Contraction.parse("ba,ac->bc", x.shape, kernel.shape)
  >>> call = LayerCall(path="fc", x=x, w=w, contraction=c, base=lambda: x @ kernel,
  ...                  fold_dtype=jnp.float32, operands=lambda: (x, kernel, None))
  >>> apply(call).tolist()  # each output sums 8 inputs times w / d_in = 1
  [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from c3a_jax import _adapter_set, _context, _contraction, _qwix, ops


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """One call of an adapted layer, as C3A needs it.

  Attributes:
    path: the layer's name in errors (its module path).
    x: the call's input, as given.
    w: its C3A kernel ``(m, n, b)``, or a stack of them ``(K, m, n, b)`` (one per slot,
      :func:`c3a_jax.stack_adapters`).
    contraction: what the call contracts (:mod:`c3a_jax._contraction`).
    base: the layer's own call, unadapted.
    fold_dtype: the dtype the layer computes in, where its call is a plain
      ``x @ kernel (+ bias)`` whose kernel can absorb the delta without rounding it; else None.
    operands: ``(x, kernel, bias)`` cast as the layer's call casts them (``bias`` may be None);
      called only to fold.
    precision: the layer's own matmul precision, kept by the folded product.
    quantized: how the layer's kernel is quantized (Qwix, e.g. ``"int8"``), or None; such a
      kernel never folds.
  """

  path: str
  x: jax.Array
  w: jax.Array
  contraction: _contraction.Contraction
  base: Callable[[], jax.Array]
  fold_dtype: Any = None
  operands: Callable[[], tuple[jax.Array, jax.Array, jax.Array | None]] | None = None
  precision: jax.lax.PrecisionLike = None
  quantized: str | None = None


def apply(call: LayerCall) -> jax.Array:
  """The layer's output with its C3A delta, under the strategy ``c3a.intercept`` set."""
  index = _adapter_set.index_for(call.path, call.w)
  _adapter_set.check_fits(call.path, call.w, call.contraction, index is not None)
  foldable = call.fold_dtype is not None and not _qwix.quantizing()
  strategy = None if index is not None else _strategy(call, foldable)
  if strategy == "fold" and foldable:
    return _folded(call)
  y = call.base()
  # Outside Qwix's interception: Qwix would take the delta's einsums for the layer's own.
  return y + _qwix.outside(_delta)(call, y.dtype, strategy, index)


def _strategy(call: LayerCall, foldable: bool) -> ops.Strategy:
  """The strategy ``intercept`` set, with ``"auto"`` resolved for this call's shapes."""
  strategy = _context.strategy.get()
  if strategy == "fold" and call.quantized:
    raise ValueError(
      f"layer {call.path!r} has a kernel quantized by Qwix ({call.quantized}); "
      "strategy='fold' would add the C3A delta into it, where its bits would round the delta "
      "away: use strategy='auto' (or 'fft', 'freq_major', 'dense'), which adds the delta to "
      "the layer's output"
    )
  if strategy != "auto":
    return strategy
  d_in = call.contraction.d_in
  rows_shape = (call.x.size // d_in, d_in)
  return ops.choose_strategy(rows_shape, call.w.shape, with_base=foldable)


def _delta(call: LayerCall, dtype: Any, strategy: ops.Strategy | None, index: Any) -> jax.Array:
  """The C3A delta of the call, laid out as its output, in ``dtype``; per row with ``index``."""
  c = call.contraction
  # Cast x as the layer casts its inputs, so the delta sees what the base matmul saw.
  rows = c.to_rows(call.x).astype(dtype)
  if index is not None:
    delta = _adapter_set.mixed_rows(call.path, rows, call.w, index)
  else:
    delta = ops.block_circulant_matmul(rows, call.w, strategy=strategy)
  return c.from_rows(delta).astype(dtype)


def _folded(call: LayerCall) -> jax.Array:
  """The layer's own product with ``kernel + delta`` for its kernel (:func:`c3a_jax.ops.fold`)."""
  c = call.contraction
  x, kernel, bias = call.operands()
  rows = ops.fold(c.to_rows(x), call.w, c.flat_kernel(kernel), precision=call.precision)
  y = c.from_rows(rows)
  if bias is not None:
    y += jnp.reshape(bias, c.bias_shape())
  return y.astype(call.fold_dtype)
