"""C3A as pure functions of a Flax params tree: attach, split, combine, merge, unmerge.

A targeted Dense dict ``{"kernel", "bias"}`` gains a ``"c3a_kernel"`` leaf of shape
``(d_out // b, d_in // b, b)``. Layers that store their kernel ``(out, in)`` (transformers'
FlaxConv1D, in GPT-2) get ``"c3a_kernel_out_in"`` instead, so the tree alone says how to merge it.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, c3a_jax as c3a
  >>> model = nn.Dense(8)
  >>> params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
  >>> cfg = c3a.C3AConfig(block_size=4, target_modules=".*")
  >>> params = c3a.attach({"dense": params}, cfg, jax.random.key(1))["dense"]
  >>> params["c3a_kernel"].shape
  (2, 2, 4)
  >>> adapter, base = c3a.split(params)
  >>> sorted(adapter), sorted(base)
  (['c3a_kernel'], ['bias', 'kernel'])
  >>> y = c3a.intercepted(model.apply)({"params": c3a.combine(adapter, base)}, jnp.ones((1, 8)))
  >>> bool(jnp.allclose(y, model.apply({"params": c3a.merge(params)}, jnp.ones((1, 8))),
  ...                   atol=1e-5))
  True
"""

from __future__ import annotations

import functools
import math
import warnings
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from c3a_jax import _merge_record, _nnx, _qwix, _tree, ops
from c3a_jax._config import C3AConfig
from c3a_jax._labels import label
from c3a_jax._layout import C3A_LEAVES, Layout, box_c3a, fits_as_set, of_shapes, rebox
from c3a_jax._layout import delta as layout_delta
from c3a_jax._targets import Target, select
from c3a_jax._tree import Params

C3A_KERNEL, C3A_KERNEL_OUT_IN = C3A_LEAVES
_WEIGHTS = ("kernel", "scale", "embedding", "weight")  # one per Flax layer, never two


def attach(
  params: Mapping,
  cfg: C3AConfig,
  rng: jax.Array | int,
  *,
  model_type: str | None = None,
  forward: Callable[[Any], Any] | None = None,
) -> Params:
  """Returns ``params`` with a C3A kernel leaf in every layer ``cfg`` selects.

  Pure: ``params`` is not modified. Each layer's kernel is drawn from ``rng`` folded with a
  hash of its path, so a layer's initial value does not depend on which other layers are adapted.
  A stacked layer (``nn.scan``) gets a stacked C3A kernel ``(L, m, n, b)``, layer ``i`` drawn
  from that key folded with ``i``. A boxed kernel (``nn.with_logical_partitioning``) gets a
  boxed C3A kernel: its stack axes named as the kernel's, ``(m, n, b)`` ``None``.

  Args:
    params: a Flax params tree.
    cfg: the C3A config.
    rng: a JAX PRNG key (``jax.random.key``, or a legacy ``jax.random.PRNGKey``), or an int
      seed in ``[0, 2**32)``, taken as ``jax.random.key(seed)`` as ``nnx.Rngs(seed)`` takes it.
    model_type: ``model.config.model_type`` for Hugging Face models: PEFT's default targets when
      ``cfg.target_modules`` is None, and the layers stored ``(out, in)`` (GPT-2's Conv1D).
    forward: runs the model on a params tree, e.g. ``lambda p: model.apply({"params": p}, x)``;
      needed for kernels of more than 2 axes (DenseGeneral, Einsum, scanned stacks), see
      :func:`c3a_jax.select`.

  Raises:
    TypeError: ``params`` is not a mapping, or ``rng`` neither a key nor an int.
    ValueError: see :func:`c3a_jax.select`; errors name the layer, its shape and the block size;
      an int seed outside ``[0, 2**32)``.

  Warns:
    UnmatchedTargetWarning: a ``target_modules`` or ``exclude_modules`` list entry names no
      module (a typo), see :func:`c3a_jax.select`.
  """
  rng = _unplaced(_key(rng))
  if _nnx.is_module(params):
    return _attach_nnx(params, cfg, rng)
  if isinstance(params, nnx.State):
    raise TypeError(
      "attach: params is an nnx.State; C3A attaches to the NNX model itself, "
      "c3a.attach(model, cfg, rng), which returns the adapted model"
    )
  if not isinstance(params, Mapping):
    raise TypeError(
      "attach: params must be a Flax params tree, a mapping such as "
      f"model.init(rng, x)['params'], or an NNX model; got {type(params).__name__}"
    )
  out = _tree.to_dict(params)
  for t in select(out, cfg, model_type=model_type, forward=forward):
    module = _tree.get(out, t.path)
    if any(leaf in module for leaf in C3A_LEAVES):
      raise ValueError(
        f"layer {t.path!r} already holds a C3A kernel; c3a.split(params) first to "
        "attach a fresh adapter to the base"
      )
    name = C3A_KERNEL_OUT_IN if t.out_in else C3A_KERNEL
    module[name] = box_c3a(module["kernel"], _initial(rng, t, cfg), t.layout)
  return out


def _key(rng: Any) -> jax.Array:
  """``rng`` as a PRNG key: an int seed is ``jax.random.key(seed)``; anything else that is not
  a key is a TypeError naming the argument (JAX's own names none). Seeds stop at 2**32, where
  JAX starts folding distinct seeds into one key."""
  if isinstance(rng, jax.core.Tracer):
    return rng
  if isinstance(rng, (int, np.integer)) and not isinstance(rng, (bool, np.bool_)):
    if not 0 <= rng < 2**32:
      raise ValueError(f"attach: rng as an int seed must be in [0, 2**32), got {rng}")
    return jax.random.key(int(rng))
  want = "a jax.random.key(seed) (or a legacy jax.random.PRNGKey), or an int seed"
  if not isinstance(rng, (jax.Array, np.ndarray)):
    raise TypeError(f"attach: rng must be {want}; got {type(rng).__name__}")
  dtype = rng.dtype
  raw = jax.random.key_data(jax.random.key(0)).shape  # a legacy key's, by the default PRNG impl
  typed = jnp.issubdtype(dtype, jax.dtypes.prng_key)
  if not ((typed and rng.shape == ()) or (dtype == np.uint32 and rng.shape == raw)):
    raise TypeError(
      f"attach: rng must be {want}; got an array of shape {rng.shape} and dtype {dtype} "
      "(for nnx.Rngs, pass rngs.params())"
    )
  return rng


def _unplaced(rng: jax.Array) -> jax.Array:
  """``rng``'s value, on no device in particular: kernels drawn from a key committed to one
  device would be committed there too, stranded away from the params they adapt."""
  if isinstance(rng, jax.core.Tracer) or not isinstance(rng, jax.Array):
    return rng
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    data = np.asarray(jax.random.key_data(rng))
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(rng))
  return jnp.asarray(np.asarray(rng))


def _attach_nnx(module: Any, cfg: C3AConfig, rng: jax.Array) -> Any:
  model = nnx.clone(module)
  view = _nnx.view(model)
  for t in select(model, cfg):
    layer = view.modules[t.path]
    if isinstance(getattr(layer, C3A_KERNEL, None), _nnx.C3AParam):
      raise ValueError(
        f"layer {t.path!r} already holds a C3A kernel; c3a.merge the model, or attach to "
        "the base model, for a fresh adapter"
      )
    _nnx.set_c3a(layer, _initial(rng, t, cfg), t.layout)
  return model


def _initial(rng: jax.Array, t: Target, cfg: C3AConfig) -> jax.Array:
  """Target ``t``'s C3A kernel: from ``rng`` folded with a hash of its path; in a stack, the
  layers ``layers_to_transform`` leaves out are zero (and :func:`c3a_jax.optimizer` keeps them
  so)."""
  w = _init(jax.random.fold_in(rng, zlib.crc32(t.path.encode())), t.shape, cfg.init_weights)
  if t.layers is not None:
    w = w * jnp.zeros(t.shape[0]).at[jnp.asarray(t.layers)].set(1.0)[:, None, None, None]
  return w


def _init(key: jax.Array, shape: tuple[int, ...], init_weights: Any) -> jax.Array:
  """``ops.init`` per layer of a stack, layer ``i`` from ``key`` folded with ``i``."""
  if len(shape) == 3:
    return ops.init(key, shape, init_weights)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(math.prod(shape[:-3])))
  one = jax.vmap(lambda k: ops.init(k, shape[-3:], init_weights))(keys)
  return one.reshape(shape)


def split(params: Mapping, cfg: C3AConfig | None = None) -> tuple[Params, Params]:
  """Splits ``params`` into ``(adapter, base)``: the trainable leaves, and the frozen rest.

  Without ``cfg`` the adapter holds the C3A kernels only; with it, also the ``modules_to_save``
  subtrees and the biases ``cfg.bias`` trains. Both keep the full nesting (``base`` keeps empty
  dicts where a whole module moved to ``adapter``), so :func:`combine` can check the fit.
  """
  params = _tree.to_dict(params)
  adapter: Params = {}
  base = _strip(params)
  for path, name, value in _tree.leaves(params):
    trainable = label(params, path, name, cfg) != "frozen"
    _tree.set_leaf(adapter if trainable else base, path, name, value)
  return adapter, base


def _strip(tree: Mapping) -> dict:
  """The nesting of ``tree`` with no leaves."""
  return {k: _strip(v) for k, v in tree.items() if isinstance(v, Mapping)}


def combine(adapter: Mapping, base: Mapping) -> Params:
  """Places every leaf of ``adapter`` into ``base`` (the inverse of :func:`split`).

  Adapter leaves replace base leaves of the same name (so a loaded head overrides the model's).
  Shapes are checked: a C3A kernel must fit its layer's kernel, any other leaf the leaf it
  replaces, and every adapter module must exist in ``base``.
  """
  out = _tree.to_dict(base)
  for path, name, value in _tree.leaves(adapter):
    try:
      module = _tree.get(out, path)
    except KeyError as e:
      raise ValueError(
        f"combine: adapter leaf {path}.{name} does not fit the base, which has no "
        f"module {e.args[0]!r}"
      ) from None
    if name in C3A_LEAVES:
      _check_fits(path, module, name, value, "combine", slots_ok=True)
    elif name in module:
      if _tree.shape(module[name]) != _tree.shape(value):
        raise ValueError(
          f"combine: adapter leaf {path}.{name} has shape {_tree.shape(value)}, "
          f"the base's has {_tree.shape(module[name])}"
        )
    elif name in _WEIGHTS and any(n in module for n in _WEIGHTS):
      # E.g. a PyTorch "weight" read as a Dense kernel where the layer is an Embed.
      raise ValueError(
        f"combine: adapter leaf {path}.{name} does not fit the base, whose module "
        f"{path!r} holds {sorted(module)}; load adapters with the model's params"
      )
    module[name] = value
  return out


def _check_fits(
  path: str, module: Mapping, name: str, w: Any, what: str, *, slots_ok: bool = False
) -> Layout:
  """How C3A kernel ``w`` lies over ``module``'s kernel; a ValueError if it does not fit.
  ``slots_ok``: ``w`` may be a set of adapters (a slot axis before ``(m, n, b)``)."""
  kernel = module.get("kernel")
  if kernel is None or len(_tree.shape(kernel)) < 2:
    raise ValueError(
      f"{what}: {path}.{name} of shape {_tree.shape(w)} needs a layer with a kernel of 2 or "
      f"more axes, but {path!r} holds {sorted(module)}"
    )
  fit = functools.partial(
    of_shapes, _tree.shape(kernel), where=f"{what}: {path}.{name}", out_in=name == C3A_KERNEL_OUT_IN
  )
  shape = _tree.shape(w)
  try:
    return fit(shape)
  except ValueError:
    layout = fits_as_set(fit, shape)
    if layout is None:
      raise
  if slots_ok:
    return layout
  raise ValueError(
    f"{what}: {path}.{name} of shape {shape} is a set of {shape[-4]} adapters "
    f"(c3a.stack_adapters); {what} takes one adapter: pick slot k with "
    "jax.tree.map(lambda w: w[..., k, :, :, :], adapters), or join them with c3a.weighted_sum"
  )


# The share of a delta's norm a low-precision merge may round away without a warning.
_LOSSY_MERGE = 0.01


def merge(params: Mapping, *, safe: bool = False, dtype: Any = None) -> Params:
  """Folds every C3A kernel into its layer's kernel and drops the C3A leaves.

  The sum is computed in float32 (float64 for float64 arrays under x64) and stored in the
  kernel's dtype (or ``dtype``). The result
  runs at the base model's speed without the interceptor. Stored in bfloat16, small deltas
  round away (about 3 significant digits are kept): with concrete arrays, a layer that would
  lose more than 1% of its delta's norm that way is named in a warning;
  ``merge(params, dtype=jnp.float32)`` keeps every delta.

  Args:
    params: a params tree holding C3A kernels.
    safe: check that every merged kernel is finite, raising a ValueError naming the layer if not.
      Needs concrete arrays (call it outside ``jit``).
    dtype: the merged kernels' dtype; default: each kernel's own.
  """
  if _nnx.is_module(params):
    model = nnx.clone(params)
    view = _nnx.view(model)
    merged = merge(view.tree, safe=safe, dtype=dtype)
    kernels: Params = {}
    for path, layer in view.modules.items():
      if isinstance(getattr(layer, C3A_KERNEL, None), _nnx.C3AParam):
        _nnx.drop_c3a(layer)
        _tree.set_leaf(kernels, path, "kernel", _tree.get(merged, path)["kernel"])
    view.write(kernels)
    return model
  out = _tree.to_dict(params)
  lossy = []
  for path, module in [("", out), *_tree.modules(out)]:
    for name in C3A_LEAVES:
      if name not in module:
        continue
      w = _tree.unbox(module.pop(name))
      layout = _check_fits(path, module, name, w, "merge")
      boxed = module["kernel"]
      kernel = _tree.unbox(boxed)
      _refuse_quantized(path, kernel)
      delta = layout_delta(w, layout)
      total = ops.compute_dtype(kernel.dtype, delta.dtype)  # float64 stays float64 (x64 mode)
      merged = (kernel.astype(total) + delta).astype(dtype or kernel.dtype)
      concrete = not isinstance(merged, jax.core.Tracer)
      if safe and not concrete:
        raise ValueError(
          "merge(safe=True) checks values, so it needs concrete arrays: call it "
          "outside jax.jit (or use safe=False inside)"
        )
      if safe and not bool(jnp.isfinite(merged).all()):
        raise ValueError(
          f"merge(safe=True): layer {path!r} would get non-finite weights; its C3A kernel "
          f"holds {int((~jnp.isfinite(w)).sum())} non-finite values, its base kernel "
          f"{int((~jnp.isfinite(kernel)).sum())}"
        )
      if concrete:
        note_rounding(lossy, path, kernel, merged, delta)
        _merge_record.remember(merged, w)
      module["kernel"] = rebox(boxed, merged)
  warn_rounding(lossy, "merge", "merge(params, dtype=jnp.float32) keeps the deltas")
  return out


def _refuse_quantized(path: str, kernel: Any) -> None:
  if _qwix.is_quantized(kernel):
    raise ValueError(
      f"merge: layer {path!r} has a kernel quantized by Qwix ({_qwix.qtype(kernel)}), which "
      "would round the C3A delta to its bits; merge the adapter into the full-precision "
      "params instead (c3a.merge(c3a.combine(adapter, full_precision_params))), then quantize "
      "that, or serve the quantized base under c3a.intercept()"
    )


def note_rounding(lossy: list, where: str, kernel: Any, merged: Any, delta: Any) -> None:
  """Adds ``where`` to ``lossy`` if storing ``kernel + delta`` as ``merged`` lost more than 1%
  of the delta's norm to rounding."""
  if jnp.finfo(merged.dtype).bits >= 32:
    return
  kept = merged.astype(jnp.float32) - kernel.astype(jnp.float32)
  lost = float(jnp.linalg.norm(kept - delta) / jnp.maximum(jnp.linalg.norm(delta), 1e-30))
  if lost > _LOSSY_MERGE:
    lossy.append((lost, where, merged.dtype.name))


def warn_rounding(lossy: list, what: str, fix: str) -> None:
  """One warning naming the worst of ``lossy`` (see :func:`note_rounding`), if any."""
  if lossy:
    worst, where, stored = max(lossy)
    warnings.warn(
      f"{what}: {len(lossy)} layer(s) stored in {stored} lose more "
      f"than {_LOSSY_MERGE:.0%} of their C3A delta to rounding (worst: {where!r}, "
      f"{worst:.0%}); {fix}",
      stacklevel=3,
    )


def unmerge(merged: Mapping, adapter: Mapping, *, check: bool = True) -> Params:
  """Undoes :func:`merge`: subtracts each C3A delta of ``adapter`` and puts its leaves back.

  For an NNX model, ``adapter`` is ``nnx.state(adapted, c3a.C3AParam)`` (or its pure dict), and
  the result is the adapted model.

  Subtracting the wrong adapter, or from params never merged, would give wrong weights without
  a sign. So ``merge`` remembers, for each kernel it returns (concrete arrays), the C3A kernel
  it merged in, and ``unmerge`` refuses a layer merged with another C3A kernel, or whose kernel
  ``merge`` did not return in this process (a copy, changed since, or saved and loaded back).
  With ``check=False`` it subtracts without asking, for merged params known to fit the adapter.

  Raises:
    ValueError: a layer is missing, still adapted, or fails the check above (naming it).
  """
  if _nnx.is_module(merged):
    model = nnx.clone(merged)
    view = _nnx.view(model)
    view.write(unmerge(view.tree, _nnx.tree_of(adapter), check=check))
    return model
  out = _tree.to_dict(merged)
  for path, name, w in _tree.leaves(adapter):
    if name not in C3A_LEAVES:
      continue
    try:
      module = _tree.get(out, path)
    except KeyError:
      raise ValueError(f"unmerge: the merged params have no layer {path!r}") from None
    if any(n in module for n in C3A_LEAVES):
      raise ValueError(f"unmerge: layer {path!r} still holds a C3A kernel, so it is not merged")
    w = _tree.unbox(w)
    layout = _check_fits(path, module, name, w, "unmerge")
    kernel = _tree.unbox(module["kernel"])
    if check:
      _check_merged(path, kernel, w)
    delta = layout_delta(w, layout)
    restored = kernel.astype(ops.compute_dtype(kernel.dtype, delta.dtype)) - delta
    module["kernel"] = rebox(module["kernel"], restored.astype(kernel.dtype))
  return combine(adapter, out)


def _check_merged(path: str, kernel: Any, w: Any) -> None:
  merged_in = _merge_record.merged_with(kernel)
  if merged_in is None:
    inside = " (unmerge checks this outside jax.jit)" if isinstance(kernel, jax.core.Tracer) else ""
    raise ValueError(
      f"unmerge: the kernel of layer {path!r} is not one c3a.merge returned in this "
      f"process{inside}, so subtracting this adapter may not give the base back (it may never "
      "have been merged, or have been copied, changed, or saved and loaded). If it is the merge "
      "of exactly this adapter, call unmerge(..., check=False)"
    )
  if isinstance(w, jax.core.Tracer) or not (
    merged_in.shape == w.shape and bool(jnp.array_equal(merged_in, w))
  ):
    raise ValueError(
      f"unmerge: layer {path!r} was merged with another C3A kernel than this adapter's; "
      "subtracting this one would not give the base back (pass the adapter merge took)"
    )
