"""Many adapters over one base: a set of them for mixed batches, and their exact weighted sum.

A C3A delta is linear in its kernel, so a weighted sum of adapters of equal block sizes is
exactly one adapter: ``delta(sum_i a_i w_i) = sum_i a_i delta(w_i)``, layer by layer. A set
stacks them, ``(*stack, K, m, n, b)``: slot ``k`` is the ``k``-th adapter (the dict's order),
and ``c3a.intercept(adapter_index=idx)`` gives row ``r`` adapter ``idx[r]`` (``-1``: none).
A layer some adapters do not adapt gets zero kernels from them, which is exact: no delta.

Only C3A kernels mix: a trained head or bias (``modules_to_save``) is one per model, so an
adapter holding one is refused, naming it. Adapters are trees as :func:`c3a_jax.split` and
:func:`c3a_jax.load_adapter` give them, or adapted NNX models.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, c3a_jax as c3a
  >>> model = nn.Dense(8)
  >>> base = {"fc": model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]}
  >>> cfg = c3a.C3AConfig(block_size=4, target_modules=["fc"], init_weights="gaussian")
  >>> a, b = (c3a.split(c3a.attach(base, cfg, jax.random.key(i)))[0] for i in (1, 2))
  >>> both = c3a.combine(c3a.stack_adapters({"a": a, "b": b}), base)
  >>> x = jnp.ones((2, 8))
  >>> run = c3a.intercepted(lambda p, x: model.apply({"params": p["fc"]}, x))
  >>> with c3a.intercept(adapter_index=jnp.array([1, -1])):
  ...   y = model.apply({"params": both["fc"]}, x)
  >>> bool(jnp.allclose(y[0], run(c3a.combine(b, base), x)[0], atol=1e-5))
  True
  >>> bool(jnp.allclose(y[1], model.apply({"params": base["fc"]}, x)[1]))
  True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from c3a_jax import _nnx, _tree
from c3a_jax._layout import C3A_LEAVES, rebox
from c3a_jax._tree import Params

C3A_KERNEL = C3A_LEAVES[0]


def stack_adapters(adapters: Mapping[str, Any]) -> Any:
  """A set of ``adapters`` (name -> adapter), each C3A kernel with a slot axis before its
  ``(m, n, b)``: slot ``k`` is the ``k``-th name. Combine it with the base (or, for NNX
  models, use the model returned) and run under ``c3a.intercept(adapter_index=...)``.

  Raises:
    ValueError: no adapters, a layer whose adapters differ in shape (block size), or an
      adapter that holds something other than C3A kernels.
  """
  return _per_layer(adapters, "stack_adapters", lambda ws: jnp.stack(ws, axis=-4), slot=True)


def weighted_sum(adapters: Mapping[str, tuple[Any, float]]) -> Any:
  """One adapter whose delta is exactly ``sum_i weight_i * delta_i``, layer by layer.

  ``adapters`` maps a name to ``(adapter, weight)``. Block sizes must agree on every layer:
  circulant blocks of one size are not circulant blocks of another, so no resampling is exact.

  Raises:
    ValueError: as :func:`stack_adapters`; a weight that is NaN or infinite, or a layer whose
      sum is not finite (the weights overflow the kernels' dtype).
    TypeError: a weight that is not a real number.
  """
  weights = [_weight(name, pair) for name, pair in adapters.items()]
  named = {name: adapter for name, (adapter, _) in adapters.items()}
  out = _per_layer(
    named, "weighted_sum", lambda ws: sum(a * w for a, w in zip(weights, ws, strict=True))
  )
  _check_finite(out)
  return out


def _weight(name: str, pair: Any) -> float:
  """The weight of ``(adapter, weight)``, a finite float: a NaN or inf would make every kernel
  of the result NaN or inf without a word."""
  if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
    raise TypeError(f"weighted_sum: adapter {name!r} must map to (adapter, weight), got {pair!r}")
  weight = pair[1]
  try:
    value = float(weight)
  except (TypeError, ValueError):
    raise TypeError(
      f"weighted_sum: adapter {name!r} has weight {weight!r}; weights are real numbers"
    ) from None
  if not math.isfinite(value):
    raise ValueError(f"weighted_sum: adapter {name!r} has weight {value}; weights must be finite")
  return value


def _check_finite(out: Any) -> None:
  """Refuses a sum whose kernel is not finite, naming the layer: finite weights may still
  overflow float32 (1e39 * w)."""
  kernels = _kernels("sum", out, "weighted_sum")
  for (path, _), w in kernels.items():
    w = _tree.unbox(w)
    if isinstance(w, jax.core.Tracer):
      return
    if not bool(jnp.isfinite(w).all()):
      raise ValueError(
        f"weighted_sum: layer {path!r} of the sum is not finite ({w.dtype}): the weights "
        "overflow it, or an adapter holds non-finite values"
      )


def replace_slot(adapters: Any, slot: int, adapter: Any) -> Any:
  """``adapters`` (a set from :func:`stack_adapters`, alone or combined with the base, or an
  NNX model holding one) with slot ``slot`` holding ``adapter`` instead: a hot swap, same
  shapes, so nothing jitted over the set retraces. A layer the new adapter does not adapt gets
  zeros in that slot.

  Raises:
    ValueError: ``slot`` out of range, or ``adapter`` adapts a layer the set does not, or with
      another shape.
  """
  if _nnx.is_module(adapters):
    held = _kernels("set", adapters, "replace_slot")
  else:  # the set alone, or combined with the base
    held = {(p, n): v for p, n, v in _tree.leaves(adapters) if n in C3A_LEAVES}
  new = _kernels("adapter", adapter, "replace_slot")
  extra = sorted(path for path, _ in new.keys() - held.keys())
  if extra:
    raise ValueError(f"replace_slot: the adapter adapts layers {extra}, which the set does not")
  joined = {}
  for key, stacked in held.items():
    shape = _tree.shape(stacked)
    if len(shape) < 4:
      raise ValueError(
        f"replace_slot: layer {key[0]!r} holds one C3A kernel {shape}, not a set of them "
        "(c3a.stack_adapters)"
      )
    if not -shape[-4] <= slot < shape[-4]:
      raise ValueError(f"replace_slot: slot {slot} is not one of the set's {shape[-4]} slots")
    w = _tree.unbox(new[key]) if key in new else jnp.zeros(shape[:-4] + shape[-3:])
    if _tree.shape(w) != shape[:-4] + shape[-3:]:
      raise ValueError(
        f"replace_slot: layer {key[0]!r} takes C3A kernels {shape[:-4] + shape[-3:]} in this set, "
        f"but the adapter's is {_tree.shape(w)} (another block size?)"
      )
    value = _tree.unbox(stacked).at[..., slot, :, :, :].set(w)
    joined[key] = rebox(stacked, value)
  return _written(adapters, joined, "replace_slot")


def _per_layer(
  adapters: Mapping[str, Any], what: str, join: Callable[[list], Any], *, slot: bool = False
) -> Any:
  if not adapters:
    raise ValueError(f"{what}: no adapters given")
  models = [a for a in adapters.values() if _nnx.is_module(a)]
  if models and len(models) != len(adapters):
    raise ValueError(f"{what}: give all adapters as NNX models or all as params trees")
  trees = {name: _kernels(name, a, what) for name, a in adapters.items()}
  layers = list(dict.fromkeys(key for tree in trees.values() for key in tree))
  joined: dict[tuple[str, str], Any] = {}
  for key in layers:
    held = {name: tree[key] for name, tree in trees.items() if key in tree}
    shapes = {name: _tree.shape(w) for name, w in held.items()}
    if len(set(shapes.values())) > 1:
      raise ValueError(
        f"{what}: layer {key[0]!r} has C3A kernels of different shapes {shapes} (the last axis "
        "is the block size); adapters mix only with one block size per layer"
      )
    like = next(iter(held.values()))
    values = [
      _tree.unbox(held[name]) if name in held else jnp.zeros(_tree.shape(like), jnp.float32)
      for name in trees
    ]
    joined[key] = _rebox(like, join(values), slot)
  return _written(models[0] if models else {}, joined, what)


def _written(into: Any, joined: dict[tuple[str, str], Any], what: str) -> Any:
  """A copy of ``into`` (an adapted NNX model, or a params tree) holding the ``joined``
  kernels."""
  if _nnx.is_module(into):
    return _into_model(into, joined, what)
  out: Params = _tree.to_dict(into)
  for (path, name), value in joined.items():
    _tree.set_leaf(out, path, name, value)
  return out


def _kernels(name: str, adapter: Any, what: str) -> dict[tuple[str, str], Any]:
  """``adapter``'s C3A kernels by (layer path, leaf); a ValueError for anything else."""
  if _nnx.is_module(adapter):
    return {
      (path, C3A_KERNEL): layer.c3a_kernel[...]
      for path, layer in _nnx.view(adapter).modules.items()
      if isinstance(getattr(layer, C3A_KERNEL, None), _nnx.C3AParam)
    }
  if isinstance(adapter, nnx.State) or not isinstance(adapter, Mapping):
    raise TypeError(
      f"{what}: adapter {name!r} is a {type(adapter).__name__}; give C3A adapters as params "
      "trees (c3a.split(params)[0], c3a.load_adapter) or adapted NNX models"
    )
  out = {}
  for path, leaf, value in _tree.leaves(adapter):
    if leaf not in C3A_LEAVES:
      raise ValueError(
        f"{what}: adapter {name!r} holds {path}.{leaf}, which is not a C3A kernel; only C3A "
        "kernels mix (a trained head or bias is one per model): give c3a.split(params, cfg)[0] "
        "without modules_to_save"
      )
    out[(path, leaf)] = value
  if not out:
    raise ValueError(f"{what}: adapter {name!r} holds no C3A kernel")
  return out


def _rebox(like: Any, value: Any, slot: bool) -> Any:
  """``value`` boxed as ``like``; a slot axis is unnamed (``None``), before ``(m, n, b)``."""
  if slot and _tree.is_box(like) and getattr(like, "names", None) is not None:
    names = tuple(like.names)
    return dataclasses.replace(like, value=value, names=(*names[:-3], None, *names[-3:]))
  return rebox(like, value)


def _into_model(model: Any, joined: dict[tuple[str, str], Any], what: str) -> Any:
  """A copy of adapted NNX ``model`` holding the ``joined`` kernels."""
  out = nnx.clone(model)
  modules = _nnx.view(out).modules
  for (path, _), value in joined.items():
    held = getattr(modules[path], C3A_KERNEL, None)
    if not isinstance(held, _nnx.C3AParam):
      raise ValueError(f"{what}: layer {path!r} is adapted in another model but not the first")
    metadata = held.get_metadata()
    sharding = metadata.get("out_sharding")
    if sharding is not None and len(sharding) != value.ndim:  # the slot axis: unnamed
      metadata["out_sharding"] = (*sharding[:-3], None, *sharding[-3:])
    metadata.pop("value", None)
    setattr(modules[path], C3A_KERNEL, _nnx.C3AParam(value, **metadata))
  return out
