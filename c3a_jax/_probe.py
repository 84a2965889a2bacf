"""Probes each linear layer's kernel layout by running the model once, abstractly.

A params tree alone cannot tell a scanned ``nn.Dense`` (kernel ``(L, d_in, d_out)``) from an
``nn.DenseGeneral`` (kernel ``(d_in, heads, head_dim)``). The model can: under
:func:`jax.eval_shape` (no FLOPs, no memory) an interceptor records, for every layer called,
the kernel it sees (inside ``nn.scan`` that is one layer's slice) and which of its axes the
input contracts with.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> model = nn.DenseGeneral((2, 4))
  >>> params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
  >>> found = probe(lambda p: model.apply({"params": p}, jnp.ones((1, 8))), params)
  >>> found[""].shape, found[""].n_in
  ((8, 2, 4), 1)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from c3a_jax import _contraction
from c3a_jax._tree import unbox


@dataclasses.dataclass(frozen=True)
class LayerShape:
  """One layer as its call saw it: its kernel's shape (per layer, in a stack), how many
  leading axes are "in", whether stored ``(out, in)``, and why C3A cannot adapt it, if so."""

  layer_class: str  # the layer's class name, for errors
  shape: tuple[int, ...]
  n_in: int = 1
  out_in: bool = False
  problem: str | None = None


def of_call(module: nn.Module, args: tuple, kwargs: dict) -> LayerShape:
  """What a call of ``module`` contracts (a layer holding a ``kernel``)."""
  layer_class = type(module).__name__
  shape = tuple(np.shape(unbox(module.get_variable("params", "kernel"))))
  out_in = _contraction.stores_out_in(module)
  try:
    return LayerShape(layer_class, shape, _contraction.of_module(module, args, kwargs).n_in, out_in)
  except ValueError as e:
    return LayerShape(layer_class, shape, problem=str(e))


def probe(forward: Callable[[Any], Any], params: Mapping) -> dict[str, LayerShape]:
  """Every layer with a ``kernel`` that ``forward(params)`` calls, by dotted module path.

  Args:
    forward: runs the model on a params tree, e.g.
      ``lambda p: model.apply({"params": p}, x)``; traced with :func:`jax.eval_shape`.
    params: the params tree to trace it with (concrete or abstract arrays).

  Raises:
    ValueError: ``forward`` fails on ``params``, or calls no layer that holds a kernel.
  """
  found: dict[str, LayerShape] = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if (
      context.method_name == "__call__"
      and module.scope is not None
      and module.has_variable("params", "kernel")
    ):
      found[".".join(module.scope.path)] = of_call(module, args, kwargs)
    return next_fun(*args, **kwargs)

  try:
    with nn.intercept_methods(record):
      # A fresh function each call: jax caches traces by function, and a cached trace would
      # not run the model (nor this interceptor) again.
      jax.eval_shape(lambda p: forward(p), params)
  except Exception as e:
    raise ValueError(
      f"forward (the function c3a traces to learn each layer's axes) failed on the params: "
      f"{type(e).__name__}: {e}. It should run the model, e.g. "
      "lambda p: model.apply({'params': p}, x)"
    ) from e
  if not found:
    raise ValueError(
      "forward ran, but called no Flax layer holding a 'kernel' param; it should run the "
      "model on the params it is given, e.g. lambda p: model.apply({'params': p}, x)"
    )
  return found
