"""C3A on Flax NNX models: the layers it adapts, :class:`C3AParam`, and the params view.

NNX layers are objects, so C3A lives in them: an adapted layer holds its kernel as
``c3a_kernel``, a :class:`C3AParam` (an ``nnx.Param`` subclass, so that NNX filters such as
``nnx.Optimizer(model, tx, wrt=c3a.C3AParam)`` pick the adapter alone), and its class becomes a
subclass whose ``__call__`` adds the delta. An adapted model therefore always computes the
adapted output, inside ``c3a.intercept()`` or not (``intercept(strategy)`` only picks how the
delta is computed); :func:`c3a_jax.merge` gives back a plain model.

Adapted: ``nnx.Linear``, ``nnx.LinearGeneral`` (without ``batch_axis``), ``nnx.Einsum``, and
einsum modules of the Tunix / Gemma kind (an ``einsum_str`` attribute and one ``nnx.Param``);
any other class once registered with :func:`register_layer`.

The library's tree functions read an NNX model through :func:`view`: its ``nnx.Param`` values as
a nested dict keyed by module path (list indices as strings), each layer's weight under
``"kernel"`` whatever its attribute name.

Example:
  >>> import jax, jax.numpy as jnp, c3a_jax as c3a
  >>> from flax import nnx
  >>> model = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
  >>> adapted = c3a.attach(model, c3a.C3AConfig(block_size=4, target_modules=".*"),
  ...                      jax.random.key(1))
  >>> adapted.c3a_kernel.shape, hasattr(model, "c3a_kernel")
  ((2, 2, 4), False)
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from c3a_jax import _contraction, _layer_call, _layout, _merge_record, _qwix, _tree, ops
from c3a_jax._layer_call import LayerCall
from c3a_jax._probe import LayerShape

C3A_KERNEL = _layout.C3A_LEAVES[0]


class C3AParam(nnx.Param):
  """A C3A kernel ``(*stack, d_out // b, d_in // b, b)`` in an NNX model."""


@dataclasses.dataclass(frozen=True)
class _LayerSpec:
  kernel: str  # the weight's attribute name
  einsum: Callable[[Any], str] | None  # the layer's einsum; None: Linear / LinearGeneral


_REGISTERED: dict[type, _LayerSpec] = {}


def register_layer(cls: type, *, kernel: str, einsum: str | Callable[[Any], str]) -> None:
  """Lets C3A adapt NNX layers of class ``cls`` (and its subclasses).

  Args:
    cls: an ``nnx.Module`` class whose call is ``jnp.einsum(spec, x, <kernel>)`` (+ a bias).
    kernel: the attribute holding its weight, an ``nnx.Param``.
    einsum: the spec, or a function of the layer returning it, e.g. ``"BTD,DNH->BTNH"``. The
      input's axes may sit anywhere in the kernel; C3A reads the kernel in "in"-first order.

  Example:
    >>> import jax.numpy as jnp, c3a_jax as c3a
    >>> from flax import nnx
    >>> class Proj(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.weight = nnx.Param(jnp.ones((8, 2, 4)))
    ...   def __call__(self, x):
    ...     return jnp.einsum("btd,dnh->btnh", x, self.weight[...])
    >>> c3a.register_layer(Proj, kernel="weight", einsum="btd,dnh->btnh")
  """
  if not (isinstance(cls, type) and issubclass(cls, nnx.Module)):
    raise TypeError(f"register_layer: {cls!r} is not an nnx.Module class")
  spec = (lambda _: einsum) if isinstance(einsum, str) else einsum
  _REGISTERED[cls] = _LayerSpec(kernel, spec)


def is_module(x: Any) -> bool:
  return isinstance(x, nnx.Module)


def _spec(layer: nnx.Module) -> _LayerSpec | None:
  for cls in type(layer).__mro__:
    if cls in _REGISTERED:
      return _REGISTERED[cls]
  if isinstance(layer, (nnx.Linear, nnx.LinearGeneral)):
    return _LayerSpec("kernel", None)
  if isinstance(layer, nnx.Einsum):
    return _LayerSpec("kernel", lambda m: m.einsum_str)
  if isinstance(getattr(layer, "einsum_str", None), str):
    weights = [k for k, v in vars(layer).items() if _is_weight(v) and not isinstance(v, C3AParam)]
    if len(weights) == 1:
      return _LayerSpec(weights[0], lambda m: m.einsum_str)
  if _is_weight(getattr(layer, "kernel", None)):
    return _LayerSpec("kernel", None)  # a layer with a kernel C3A does not know: refused by name
  return None


def _is_weight(v: Any) -> bool:
  """A layer's weight: an ``nnx.Param``, or one Qwix quantized (a pytree of Params)."""
  return isinstance(v, nnx.Param) or _qwix.is_quantized(v)


def weight(layer: nnx.Module, layer_spec: _LayerSpec | None = None) -> Any:
  """``layer``'s weight: its array, or the quantized weight Qwix put in its place."""
  held = getattr(layer, (layer_spec or _spec(layer)).kernel)
  return held if _qwix.is_quantized(held) else held[...]


def _supported(layer: nnx.Module, layer_spec: _LayerSpec) -> str | None:
  """Why C3A cannot adapt ``layer``, or None."""
  if layer_spec.einsum is not None or isinstance(layer, (nnx.Linear, nnx.LinearGeneral)):
    if isinstance(layer, nnx.LinearGeneral) and layer.batch_axis:
      return (
        f"LinearGeneral with batch_axis={dict(layer.batch_axis)} has one kernel per batch "
        "index; C3A adapts LinearGeneral without batch_axis"
      )
    return None
  return (
    f"{type(layer).__name__} is not a layer C3A adapts (nnx.Linear, nnx.LinearGeneral, "
    "nnx.Einsum, einsum modules with an einsum_str); c3a.register_layer adds a class"
  )


def _rank(layer: nnx.Module, layer_spec: _LayerSpec) -> tuple[int, str | None]:
  """The per-layer rank of the kernel, and its einsum if it has one."""
  if layer_spec.einsum is not None:
    spec = layer_spec.einsum(layer).replace(" ", "")
    return len(spec.split("->")[0].split(",")[1].replace("...", "")), spec
  if isinstance(layer, nnx.LinearGeneral):
    return len(layer.in_features) + len(layer.out_features), None
  return 2, None


def _static(layer: nnx.Module, layer_spec: _LayerSpec) -> tuple[LayerShape, tuple[int, ...] | None]:
  """What a call of ``layer`` contracts, read from its attributes (no call needed), and how
  its kernel (stack axes included) is transposed into the layout rule's "in"-first order
  (None where it already is)."""
  name = type(layer).__name__
  shape = tuple(np.shape(weight(layer, layer_spec)))
  problem = _supported(layer, layer_spec)
  if problem:
    return LayerShape(name, shape, problem=problem), None
  rank, spec = _rank(layer, layer_spec)
  if rank > len(shape):
    problem = f"its kernel {shape} has fewer axes than its einsum {spec}"
    return LayerShape(name, shape, problem=problem), None
  n_stack = len(shape) - rank
  unstacked = shape[n_stack:]
  if spec is None:
    n_in = len(layer.in_features) if isinstance(layer, nnx.LinearGeneral) else 1
    return LayerShape(name, unstacked, n_in), None
  x_letters, k_letters = re.sub(r"\.\.\.", "", spec.split("->")[0]).split(",")
  dims = dict(zip(k_letters, unstacked, strict=True))
  x_shape = [dims.get(a, 1) for a in x_letters]  # a made-up input: sizes from the kernel, or 1
  try:
    c = _contraction.Contraction.parse(spec, x_shape, unstacked, any_order=True)
  except ValueError as e:
    return LayerShape(name, unstacked, problem=str(e)), None
  permuted = LayerShape(name, tuple(unstacked[i] for i in c.perm), c.n_in)
  if c.perm == tuple(range(rank)):
    return permuted, None
  held = weight(layer, layer_spec)
  if _qwix.is_quantized(held):  # the view leaves it as it is, so no permutation to undo
    return LayerShape(name, unstacked, problem=_relaid_quantized(spec, held)), None
  return permuted, (*range(n_stack), *(n_stack + p for p in c.perm))


def _relaid_quantized(spec: str, held: Any) -> str:
  return (
    f"its kernel is quantized by Qwix ({_qwix.qtype(held)}) and its input axis is not the "
    f"kernel's first (einsum {spec!r}); c3a reads such kernels transposed, which a quantized "
    "kernel cannot be without requantizing it. Leave this layer unquantized (Qwix's "
    "module_path rule), or adapt it before quantizing another copy"
  )


def shape_of(layer: nnx.Module, layer_spec: _LayerSpec) -> LayerShape:
  """What a call of ``layer`` contracts (its kernel's shape in "in"-first order)."""
  return _static(layer, layer_spec)[0]


def permutation(layer: nnx.Module) -> tuple[int, ...] | None:
  """How the layer's kernel (stack axes included) is transposed into the layout rule's order
  ("in" axes first), or None where it already is: Gemma's ``"BTD,NDH->BTNH"`` gives
  ``(1, 0, 2)``. The params view holds such kernels transposed."""
  layer_spec = _spec(layer)
  return None if layer_spec is None else _static(layer, layer_spec)[1]


def contraction(layer: nnx.Module, args: tuple, kwargs: dict) -> _contraction.Contraction:
  """The contraction of ``layer(*args, **kwargs)``, with the actual input."""
  layer_spec = _spec(layer)
  x = args[0] if args else next(iter(kwargs.values()))
  shape = np.shape(weight(layer, layer_spec))
  if isinstance(layer, nnx.Einsum):
    spec = args[1] if len(args) > 1 else kwargs.get("einsum_str") or layer.einsum_str
    return _contraction.Contraction.parse(spec, np.shape(x), shape, any_order=True)
  if layer_spec.einsum is not None:
    spec = layer_spec.einsum(layer)
    return _contraction.Contraction.parse(spec, np.shape(x), shape, any_order=True)
  axes = layer.axis if isinstance(layer, nnx.LinearGeneral) else -1
  return _contraction.over_axes(np.shape(x), shape, _contraction.as_axes(axes))


def _adapted_call(self, *args, **kwargs):
  return _layer_call.apply(_nnx_call(self, args, kwargs))


def _nnx_call(layer: nnx.Module, args: tuple, kwargs: dict) -> LayerCall:
  """An adapted NNX layer's call, as :func:`c3a_jax._layer_call.apply` reads it."""
  base = type(layer).c3a_base
  x = args[0] if args else next(iter(kwargs.values()))
  kernel = weight(layer)
  quantized = _qwix.qtype(kernel) if _qwix.is_quantized(kernel) else None
  fold_dtype = None if quantized else _fold_dtype(layer, x)
  return LayerCall(
    path=base.__name__,
    x=x,
    w=layer.c3a_kernel[...],
    contraction=contraction(layer, args, kwargs),
    base=lambda: base.__call__(layer, *args, **kwargs),
    fold_dtype=fold_dtype,
    operands=lambda: _operands(layer, x, fold_dtype),
    precision=getattr(layer, "precision", None),
    quantized=quantized,
  )


_PLAIN = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)
# Einsum modules whose call is exactly jnp.einsum(einsum_str, x, w) in their dtype, no bias.
_EXACT_EINSUM = ("tunix.models.",)


def _fold_dtype(layer: nnx.Module, x: Any) -> Any:
  """The dtype of a layer whose call c3a can rewrite as ``x @ (kernel + delta)`` (``"fold"``,
  :func:`c3a_jax.ops.can_fold`); else None."""
  base = type(layer).c3a_base
  if base in _PLAIN:
    # Only the stock arithmetic: no injected dot_general / einsum_op / promotion.
    stock = {
      "dot_general": (jax.lax.dot_general, None),
      "dot_general_cls": (None,),
      "einsum_op": (jnp.einsum, None),
      "preferred_element_type": (None,),
    }
    if any(getattr(layer, a, None) not in ok for a, ok in stock.items()):
      return None
  elif not (base.__name__ == "Einsum" and base.__module__.startswith(_EXACT_EINSUM)):
    return None
  kernel = weight(layer)
  dtype = jnp.dtype(getattr(layer, "dtype", None) or jnp.result_type(x, kernel))
  precision = getattr(layer, "precision", None)
  foldable = all(ops.can_fold(d, precision=precision) for d in (dtype, kernel.dtype))
  return dtype if foldable else None


def _operands(layer: nnx.Module, x: Any, dtype: Any) -> tuple[Any, Any, Any]:
  """``x``, the kernel and the bias (or None), in the dtype the layer computes in."""
  kernel = weight(layer)
  bias = layer.bias[...] if getattr(layer, "bias", None) is not None else None
  return tuple(None if a is None else a.astype(dtype) for a in (x, kernel, bias))


@functools.cache
def _adapted_class(cls: type) -> type:
  """``cls`` with a ``__call__`` that adds the C3A delta. Cached, so that NNX graph definitions
  (and jit caches) of equal models compare equal: one class per base, as ``nnx.LoRALinear`` is
  ``nnx.Linear``'s."""
  return type(
    f"C3A{cls.__name__}",
    (cls,),
    {"__call__": _adapted_call, "c3a_base": cls, "__module__": cls.__module__},
  )


def set_c3a(layer: nnx.Module, w: jax.Array, layout: _layout.Layout) -> None:
  """Gives ``layer`` the C3A kernel ``w``: named like its kernel's sharding, stack axes first."""
  held = getattr(layer, _spec(layer).kernel)
  kernel = {} if _qwix.is_quantized(held) else held.get_metadata()
  metadata = {k: kernel[k] for k in ("eager_sharding",) if k in kernel}
  for key in ("out_sharding", "sharding_names", "sharding"):
    if kernel.get(key) is not None:
      metadata[key] = tuple(kernel[key])[: len(layout.stack)] + (None,) * (
        np.ndim(w) - len(layout.stack)
      )
  held_c3a = getattr(layer, C3A_KERNEL, None)
  if isinstance(held_c3a, C3AParam) and np.shape(held_c3a[...]) == np.shape(w):
    layer.c3a_kernel[...] = w
  else:
    layer.c3a_kernel = C3AParam(w, **metadata)
  if "c3a_base" not in vars(type(layer)):
    layer.__class__ = _adapted_class(type(layer))


def drop_c3a(layer: nnx.Module) -> None:
  """Removes ``layer``'s C3A kernel and gives it back its own class."""
  del layer.c3a_kernel
  layer.__class__ = type(layer).c3a_base


@dataclasses.dataclass
class View:
  """An NNX model read as a params tree: ``tree`` (a nested dict of ``nnx.Param`` values),
  every module by path, and each layer C3A knows with its layout."""

  tree: dict
  modules: dict[str, nnx.Module]
  layers: dict[str, LayerShape]

  def write(self, tree: Mapping) -> None:
    """Sets every leaf of ``tree`` into the model: a ``c3a_kernel`` attaches (or updates) the
    layer's C3A kernel, ``kernel`` is the layer's weight whatever its name."""
    for path, name, value in _tree.leaves(tree):
      module = self.modules.get(path)
      if module is None:
        raise ValueError(f"the NNX model has no module {path!r}")
      perm = permutation(module)
      if name == C3A_KERNEL:
        kernel = np.shape(weight(module))
        if perm is not None:
          kernel = tuple(kernel[i] for i in perm)
        fit = functools.partial(_layout.of_shapes, kernel, where=f"{path}.{name}")
        try:
          layout = fit(np.shape(value))
        except ValueError:
          layout = _layout.fits_as_set(fit, np.shape(value))  # a set of adapters
          if layout is None:
            raise
        set_c3a(module, value, layout)
        continue
      if name == "kernel" and _spec(module):
        attr = _spec(module).kernel
        if _qwix.is_quantized(value):  # frozen, as the view read it: put back whole
          setattr(module, attr, value)
          continue
        if perm is not None:  # the view holds it in the layout rule's order
          value = _merge_record.carry(value, jnp.transpose(value, np.argsort(perm)))
      else:
        attr = name
      getattr(module, attr)[...] = value


def tree_of(state: Any) -> Any:
  """An ``nnx.State`` (e.g. ``nnx.state(model, C3AParam)``) as a nested dict with string keys;
  any other tree as it is."""
  if isinstance(state, nnx.State):
    state = nnx.to_pure_dict(state)

  def strs(node):
    if not isinstance(node, Mapping):
      return node
    return {str(k): strs(v) for k, v in node.items()}

  return strs(state)


def view(model: nnx.Module) -> View:
  """``model`` read as a params tree (see the module docstring)."""
  modules: dict[str, nnx.Module] = {}
  layers: dict[str, LayerShape] = {}
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Module):
      continue
    key = ".".join(str(p) for p in path)
    held = getattr(node, C3A_KERNEL, None)
    if held is not None and not (isinstance(held, C3AParam) and "c3a_base" in vars(type(node))):
      raise ValueError(
        f"layer {key!r} ({type(node).__name__}) holds a c3a_kernel that c3a.attach did not set, "
        "so its call ignores it; adapt NNX models with c3a.attach, c3a.load_adapter or "
        "c3a.unmerge"
      )
    modules[key] = node
    layer_spec = _spec(node)
    if layer_spec is not None:
      layers[key] = shape_of(node, layer_spec)
  tree: dict = {}
  for key, module in modules.items():
    for leaf, value in _leaves(key, module):
      _tree.set_leaf(tree, key, leaf, value)
  return View(tree, modules, layers)


def _leaves(key: str, module: nnx.Module) -> Iterator[tuple[str, Any]]:
  """``module``'s own params as the view names them: its weight as ``"kernel"``, in the
  layout rule's axis order; a weight Qwix quantized as it is (frozen; a layer whose quantized
  kernel would need relaying is refused as a target, :func:`_static`)."""
  layer_spec = _spec(module)
  for name, var in vars(module).items():
    is_kernel = layer_spec is not None and name == layer_spec.kernel
    if not (isinstance(var, nnx.Param) or (is_kernel and _qwix.is_quantized(var))):
      continue
    if _qwix.is_quantized(var):
      yield "kernel", var
      continue
    perm = permutation(module) if is_kernel else None
    value = var[...]
    if perm is not None:
      value = _merge_record.carry(value, jnp.transpose(value, perm))
    yield ("kernel" if is_kernel else name), value


def nnx_params(model: nnx.Module) -> dict:
  """``model``'s ``nnx.Param`` values as a params tree, the library's view of an NNX model.

  A nested dict keyed by module path (list indices as strings); each layer C3A adapts has its
  weight under ``"kernel"`` whatever its attribute is called (in the layout rule's axis order),
  and its C3A kernel under ``"c3a_kernel"``. With :func:`set_nnx_params`, an NNX model trains
  as a pure function of such a tree (``c3a.make_train_step``; the ``c3a-jax`` command's Tunix
  models): rebuild the model inside the traced step (``nnx.merge``) and set the tree into it.

  Example:
    >>> import jax, c3a_jax as c3a
    >>> from flax import nnx
    >>> model = c3a.attach(nnx.Linear(8, 4, rngs=nnx.Rngs(0)),
    ...                    c3a.C3AConfig(block_size=4, target_modules=".*"), jax.random.key(1))
    >>> params = c3a.nnx_params(model)
    >>> {name: value.shape for name, value in sorted(params.items())}
    {'bias': (4,), 'c3a_kernel': (1, 2, 4), 'kernel': (8, 4)}
  """
  return view(model).tree


def set_nnx_params(model: nnx.Module, params: Mapping) -> None:
  """Sets every leaf of ``params`` (a tree as :func:`nnx_params` gives) into ``model``, in place.

  A ``"c3a_kernel"`` leaf attaches the layer's C3A kernel, or replaces it; ``"kernel"`` is the
  layer's weight whatever its attribute is called. A path the model lacks is a ValueError
  naming it.

  Example:
    >>> import jax, jax.numpy as jnp, c3a_jax as c3a
    >>> from flax import nnx
    >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    >>> c3a.set_nnx_params(model, {"c3a_kernel": jnp.ones((1, 2, 4)), "bias": jnp.zeros(4)})
    >>> type(model.c3a_kernel).__name__, model(jnp.ones((1, 8))).shape
    ('C3AParam', (1, 4))
  """
  view(model).write(params)
