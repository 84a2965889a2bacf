"""A frozen base quantized by Qwix, for C3A to train over (QC3A, the QLoRA workflow).

Qwix's post-training quantization (PTQ) stores each matched layer's weight in 8 or 4 bits and
computes the layer's product from them; C3A adds its float32 delta to that output and never
folds into a quantized kernel (:mod:`c3a_jax._qwix`). The functions here are Qwix's PTQ with
what c3a users need around it: one rule from three settings (:func:`provider`), linen params
quantized in place, ``nn.scan`` stacks included (:func:`quantize_linen`), NNX models, Tunix's
einsum modules included (:func:`quantize_nnx`), and the float weights back for measuring what
quantization costs (:func:`dequantize`). The adapter trained over a quantized base is a plain C3A
adapter of the full-precision model: ``save_adapter`` writes what PEFT loads onto it.

Needs ``qwix`` (the ``[tunix]`` extra); ``import c3a_jax`` does not.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, c3a_jax as c3a
  >>> model = nn.Dense(16)
  >>> x = jnp.ones((2, 16))
  >>> params = model.init(jax.random.key(0), x)["params"]
  >>> qmodel, qparams = c3a.quantize.quantize_linen(model, params, x, weights="int8")
  >>> qparams["kernel"].array.qvalue.dtype
  dtype('int8')
  >>> cfg = c3a.C3AConfig(block_size=8, target_modules=".*")
  >>> adapted = c3a.attach(qparams, cfg, jax.random.key(1))
  >>> y = c3a.intercepted(qmodel.apply)({"params": adapted}, x)   # Qwix's product + C3A's delta
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax

from c3a_jax import _probe, _qwix, _tree

__all__ = ["WEIGHTS", "TunixCasts", "dequantize", "provider", "quantize_linen", "quantize_nnx"]

WEIGHTS = ("int8", "int4", "nf4", "float8_e4m3fn")
"""Weight types for a frozen base: Qwix's 8- and 4-bit integer, NormalFloat4 and fp8 types."""


class TunixCasts:
  """Mixed into a Qwix provider (``class P(TunixCasts, qwix.LoraProvider)``), it casts a
  quantized weight where Tunix's einsum modules call ``jnp.astype`` on their weight, which
  Qwix 0.1 does not intercept (their call fails on a quantized weight without it)."""

  def get_intercept_map(self) -> dict:
    import jax.numpy as jnp

    def astype(x, dtype, copy=False, device=None):
      if _qwix.is_quantized(x):
        return x.replace(array=x.array.astype(dtype)) if hasattr(x, "how") else x.astype(dtype)
      return jnp.astype(x, dtype, copy=copy, device=device)

    return super().get_intercept_map() | {"jax.numpy.astype": astype}


def provider(
  weights: str = "int8", *, tile_size: int | float | None = None, module_path: str = ".*"
) -> Any:
  """A ``qwix.PtqProvider`` quantizing the weights of the layers ``module_path`` matches.

  Args:
    weights: one of :data:`WEIGHTS`.
    tile_size: Qwix's sub-channel tiling of the contracted axis (e.g. 32, 64, 128; a float
      ``1/k`` makes ``k`` tiles); None: one scale per output channel.
    module_path: a regex over Qwix's module paths (``/``-joined, e.g. ``layers/0/attn/q_proj``).
      For Tunix's models, ``r".*(_proj|_einsum)"`` takes every projection and leaves Gemma's
      embedder alone (its tied output einsum would quantize the embedding table, which the
      embedder then indexes as floats).

  The provider casts a quantized weight where Tunix's einsum modules call ``jnp.astype``
  (:class:`TunixCasts`).
  """
  import jax.numpy as jnp
  import qwix

  if weights not in WEIGHTS:
    raise ValueError(f"quantize: weights={weights!r} is not one of {WEIGHTS}")
  qtype = getattr(jnp, weights) if weights.startswith("float8") else weights

  class _Provider(TunixCasts, qwix.PtqProvider):
    pass

  # Products of weights alone: a convolution's (a ViT's patch embedding) is not C3A's business.
  rule = qwix.QuantizationRule(
    module_path=module_path,
    weight_qtype=qtype,
    tile_size=tile_size,
    op_names=("dot_general", "einsum"),
  )
  return _Provider([rule])


def quantize_linen(
  model: Any, params: Mapping, *inputs: Any, rng: jax.Array | None = None, **settings: Any
) -> tuple[Any, dict]:
  """``model`` with Qwix's quantized products, and ``params`` with its weights quantized.

  Args:
    model: a linen module.
    params: its float params (``"params"`` collection), C3A kernels allowed (kept as they are).
    *inputs: an example input for ``model.apply`` (shapes only are used).
    rng: for the abstract ``init`` that tells which weights Qwix quantizes.
    **settings: :func:`provider`'s ``weights``, ``tile_size``, ``module_path``.

  Layers stacked by ``nn.scan`` are quantized one layer at a time, as Qwix's products see them.
  """
  import qwix

  qmodel = qwix.quantize_model(model, provider(**settings))
  key = jax.random.key(0) if rng is None else rng
  abstract = jax.eval_shape(lambda: qmodel.init(key, *inputs))["params"]
  out = _tree.to_dict(params)
  # Each layer's kernel as its call sees it: inside nn.scan one layer's slice, which is what
  # Qwix's rule describes (its abstract init gives the stack that rule, not one per layer).
  calls = _probe.probe(lambda p: model.apply({"params": p}, *inputs), out)
  for path, name, how in _tree.leaves(_tree.to_dict(abstract)):
    how = _tree.unbox(how)
    if _qwix.is_quantized(how) and name in _tree.get(out, path):
      node = _tree.get(out, path)
      w = _tree.unbox(node[name])
      layer = calls.get(path) if name == "kernel" else None
      n_stack = w.ndim - len(layer.shape) if layer is not None else 0
      node[name] = _quantized(w, how, n_stack)
  return qmodel, out


def _quantized(w: jax.Array, abstract: Any, n_stack: int) -> Any:
  """``w`` quantized as ``abstract`` (Qwix's abstract weight) says, one layer at a time over
  ``n_stack`` leading stack axes (Qwix's own ``quantize_params`` would quantize a stack as one
  weight, with one scale across its layers)."""
  from qwix._src.core import qarray

  fn = functools.partial(qarray.quantize, how=abstract.how)
  for _ in range(n_stack):
    fn = jax.vmap(fn)
  return abstract.replace(array=fn(w))


def quantize_nnx(model: Any, *inputs: Any, **settings: Any) -> Any:
  """A copy of the NNX ``model`` whose matched layers compute Qwix's quantized products.

  Works before or after :func:`c3a_jax.attach` (the C3A kernels stay float32). ``inputs`` are an
  example call of the model; ``settings`` are :func:`provider`'s.
  """
  import qwix

  return qwix.quantize_model(model, provider(**settings), *inputs)


def dequantize(tree: Any) -> Any:
  """``tree`` (params, or an NNX model's :func:`c3a_jax.nnx_params`) with every quantized
  weight back in float: the base Qwix's products compute with, to measure their error."""
  import qwix

  def one(x):
    return qwix.dequantize(x.array) if hasattr(x, "how") else qwix.dequantize(x)

  quantized = _qwix.is_quantized
  return jax.tree.map(lambda x: one(x) if quantized(x) else x, tree, is_leaf=quantized)
