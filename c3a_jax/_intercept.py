"""Runs a Flax model with its C3A kernels: an interceptor adds the FFT delta to adapted layers.

Nothing about the model changes. Flax ignores the extra ``c3a_kernel`` leaves, so a plain call
is the base model; under :func:`intercept` every ``nn.Dense``, ``nn.DenseGeneral`` and
``nn.Einsum`` (and transformers' ``FlaxConv1D``) whose scope holds a C3A kernel returns
``y + delta(x)``: the input's contracted axes flattened to rows, ``block_circulant_matmul``,
and the rows laid out as the layer's output (:mod:`c3a_jax._contraction`). A plain float32
layer (GPT-2's Conv1D too) under ``strategy="auto"`` (or ``"fold"``) computes the same sum
with ``kernel + delta`` for its kernel (:func:`c3a_jax.ops.fold`), so that the adapter rides
on the layer's own matmuls. Inside ``nn.scan`` / ``nn.vmap`` each layer sees its slice of a stacked
C3A kernel.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, c3a_jax as c3a
  >>> model = nn.Dense(4)
  >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  >>> params["c3a_kernel"] = jnp.ones((2, 2, 2))
  >>> with c3a.intercept():
  ...   y = model.apply({"params": params}, jnp.ones((1, 4)))
  >>> y_jit = jax.jit(c3a.intercepted(model.apply))({"params": params}, jnp.ones((1, 4)))
  >>> fft = c3a.intercepted(model.apply, strategy="fft")
  >>> y_fft = jax.jit(fft)({"params": params}, jnp.ones((1, 4)))
  >>> bool(jnp.allclose(y, y_fft, atol=1e-6))
  True

``strategy`` (default ``"auto"``) picks how the delta is computed (see
:func:`c3a_jax.ops.block_circulant_matmul`); every strategy gives the same values.

Put the interceptor inside what you ``jit`` (as :func:`intercepted` does): a function traced
without it and cached by ``jit`` would not see it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

from c3a_jax import _context, _contraction, _layer_call, _qwix, ops
from c3a_jax._layer_call import LayerCall
from c3a_jax._layout import C3A_LEAVES
from c3a_jax._tree import unbox

C3A_KERNEL, C3A_KERNEL_OUT_IN = C3A_LEAVES
F = TypeVar("F", bound=Callable[..., Any])


def _interceptor(next_fun, args, kwargs, context):
  module = context.module
  if context.method_name != "__call__" or module.scope is None:
    return next_fun(*args, **kwargs)
  if isinstance(module, nnx.bridge.ToLinen) and _holds_c3a(module.variables.get("params", {})):
    raise ValueError(
      f"module {'.'.join(module.scope.path)!r} is an NNX model bridged with "
      "nnx.bridge.ToLinen and holds C3A kernels, which the linen interceptor cannot apply "
      "inside it; adapt the NNX model with c3a.attach(nnx_model, cfg, rng) before bridging"
    )
  if not any(module.has_variable("params", n) for n in C3A_LEAVES):
    return next_fun(*args, **kwargs)
  return _layer_call.apply(_linen_call(module, args, kwargs, next_fun))


def _linen_call(module: nn.Module, args: tuple, kwargs: dict, next_fun: Callable) -> LayerCall:
  """A linen layer's call that holds a C3A kernel, as :func:`c3a_jax._layer_call.apply` reads it."""
  path = ".".join(module.scope.path)
  w = unbox(module.get_variable("params", _c3a_leaf(module, path)))
  try:
    c = _contraction.of_module(module, args, kwargs)
  except ValueError as e:
    raise ValueError(f"layer {path!r} holds a C3A kernel, but: {e}") from None
  x = args[0] if args else kwargs["inputs"]
  kernel = unbox(module.get_variable("params", "kernel"))
  quantized = _qwix.qtype(kernel) if _qwix.is_quantized(kernel) else None
  fold_dtype = None if quantized else _fold_dtype(module, x)
  return LayerCall(
    path=path,
    x=x,
    w=w,
    contraction=c,
    base=lambda: next_fun(*args, **kwargs),
    fold_dtype=fold_dtype,
    operands=lambda: _operands(module, x, fold_dtype),
    precision=module.precision,
    quantized=quantized,
  )


def _c3a_leaf(module: nn.Module, path: str) -> str:
  """The C3A leaf ``module`` holds; a ValueError if it is the other layout's."""
  held = [n for n in C3A_LEAVES if module.has_variable("params", n)]
  out_in = _contraction.stores_out_in(module)
  name = C3A_KERNEL_OUT_IN if out_in else C3A_KERNEL
  if held != [name]:
    raise ValueError(
      f"layer {path!r} is a {type(module).__name__} but holds {held[0]!r}: its kernel is stored "
      + (
        "(out, in); attach with model_type='gpt2' (or the model's type) so the C3A kernel "
        "gets that layout"
        if out_in
        else "(in, out), not (out, in)"
      )
    )
  return name


# The layers whose call is exactly ``x @ kernel (+ bias)`` in their dtype: what "fold" rewrites.
_PLAIN_CALLS = (nn.Dense.__call__, nn.DenseGeneral.__call__, nn.Einsum.__call__)


def _holds_c3a(tree: Any) -> bool:
  if not isinstance(tree, Mapping):
    return False
  return any(k in C3A_LEAVES or _holds_c3a(v) for k, v in tree.items())


def _fold_dtype(module: nn.Module, x: Any) -> Any:
  """The dtype a plain layer computes in, if its kernel can absorb the delta (``"fold"``)
  without rounding (:func:`c3a_jax.ops.can_fold`); else None."""
  if _contraction.stores_out_in(module):
    return module.dtype if ops.can_fold(module.dtype, precision=module.precision) else None
  if (
    type(module).__call__ not in _PLAIN_CALLS
    or getattr(module, "dot_general", None) is not None
    or getattr(module, "dot_general_cls", None) is not None
    or getattr(module, "preferred_element_type", None) is not None
  ):
    return None
  kernel = unbox(module.get_variable("params", "kernel"))
  dtype = jnp.dtype(module.dtype or jnp.result_type(x, kernel))
  return dtype if ops.can_fold(dtype, precision=module.precision) else None


def _operands(module: nn.Module, x: Any, dtype: Any) -> tuple[Any, Any, Any]:
  """``x``, the kernel and the bias (or None) cast as ``module``'s call casts them."""
  kernel = unbox(module.get_variable("params", "kernel"))
  bias = unbox(module.get_variable("params", "bias")) if module.use_bias else None
  if _contraction.stores_out_in(module):  # FlaxConv1D casts each to its dtype
    return tuple(None if a is None else jnp.asarray(a, dtype) for a in (x, kernel, bias))
  return module.promote_dtype(x, kernel, bias, dtype=module.dtype)


@contextlib.contextmanager
def intercept(strategy: ops.Strategy = "auto", *, adapter_index: Any = None) -> Iterator[None]:
  """Within this context, Flax Dense layers holding a C3A kernel add its delta.

  Args:
    strategy: how the delta is computed, one of ``c3a_jax.ops.STRATEGIES``; all give equal
      results. ``"auto"`` and ``"fold"`` fold the delta into a float32 Dense's kernel, and on
      CPU a bfloat16 one's (:func:`c3a_jax.ops.fold`, :func:`c3a_jax.ops.can_fold`;
      ``"auto"`` only with enough tokens); every other layer, and
      every other strategy, adds ``block_circulant_matmul(x, w, strategy)`` to its output.
    adapter_index: for params holding a set of adapters (:func:`c3a_jax.stack_adapters`), an
      integer array with one entry per row of the batch: the slot of row ``r``'s adapter, or
      ``-1`` for the base model. Each row computes exactly what its adapter alone would
      (:func:`c3a_jax.ops.mixed_matmul`; ``strategy`` does not apply to such layers).

  Re-entrant: nested ``intercept()`` (e.g. an :func:`intercepted` function called inside one) adds
  each delta once; the innermost ``strategy`` applies, and the innermost ``adapter_index``
  that is given.
  """
  # A warning names the caller's `with`: past check_strategy, this generator, contextlib.
  strategy = ops.check_strategy(strategy, "intercept", stacklevel=4)
  strategy_token = _context.strategy.set(strategy)
  index_token = None
  if adapter_index is not None:
    index_token = _context.adapter_index.set(jnp.asarray(adapter_index))
  try:
    if _context.active.get():
      yield
      return
    token = _context.active.set(True)
    try:
      with nn.intercept_methods(_interceptor):
        yield
    finally:
      _context.active.reset(token)
  finally:
    _context.strategy.reset(strategy_token)
    if index_token is not None:
      _context.adapter_index.reset(index_token)


def intercepted(fn: F, *, strategy: ops.Strategy = "auto") -> F:
  """``fn`` (e.g. ``model.apply``) run under ``intercept(strategy)``; safe to ``jit``."""
  strategy = ops.check_strategy(strategy, "intercepted")

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with intercept(strategy):
      return fn(*args, **kwargs)

  return wrapped
