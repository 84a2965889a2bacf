"""Adapters in Hugging Face PEFT's format: adapter_config.json + adapter_model.safetensors.

Keys are ``base_model.model.<module path>.c3a_kernel`` (shape ``(m, n, b)`` as is) and, for
``modules_to_save`` and trained biases, ``base_model.model.<module path>.weight|bias`` in PyTorch
layout (Dense ``kernel`` -> ``weight`` transposed, LayerNorm ``scale`` -> ``weight``, Embed
``embedding`` -> ``weight``), as transformers names them. PEFT loads what this writes with
``PeftModel.from_pretrained`` and this loads what PEFT saves.

Example:
  >>> import tempfile, jax, jax.numpy as jnp, c3a_jax as c3a
  >>> params = {"layer": {"query": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}}}
  >>> cfg = c3a.C3AConfig(block_size=4, target_modules=["query"])
  >>> params = c3a.attach(params, cfg, jax.random.key(0))
  >>> path = tempfile.mkdtemp()
  >>> c3a.save_adapter(path, params, cfg)
  >>> adapter, cfg2 = c3a.load_adapter(path, params)
  >>> w = params["layer"]["query"]["c3a_kernel"]
  >>> bool((adapter["layer"]["query"]["c3a_kernel"] == w).all())
  True
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from c3a_jax import _lora_export, _nnx, _tree, key_maps
from c3a_jax._config import CONFIG_NAME, C3AConfig
from c3a_jax._layout import C3A_LEAVES
from c3a_jax._targets import (
  block_size_for,
  is_linear,
  layer_path,
  named_target,
  stack_layers,
  trains_fully,
)
from c3a_jax._transform import combine, split
from c3a_jax._tree import Params
from c3a_jax.io import atomic_write, brief, publish_directory
from c3a_jax.key_maps import KeyMap

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
C3A_KERNEL, C3A_KERNEL_OUT_IN = C3A_LEAVES


def _to_torch(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """A Flax leaf as transformers' Flax-to-PyTorch conversion names and lays it out."""
  if name == "kernel":
    # Dense (in, out) -> (out, in); Conv (*spatial, in, out) -> (out, in, *spatial).
    nd = value.ndim
    return "weight", value.transpose(nd - 1, nd - 2, *range(nd - 2))
  if name in ("scale", "embedding"):
    return "weight", value
  return name, value


def _kernel_from_torch(value: np.ndarray) -> np.ndarray:
  nd = value.ndim
  return value.transpose(*range(2, nd), 1, 0)


def _from_torch(name: str, value: np.ndarray, module: Mapping | None, key: str) -> str:
  """The Flax leaf name of a PyTorch ``name`` (``module`` resolves ``weight``; else by rank)."""
  if name != "weight":
    return name
  if module is not None:
    # A Flax leaf may itself be called "weight" (transformers' FlaxLlamaRMSNorm).
    found = [n for n in ("weight", "kernel", "scale", "embedding") if n in module]
    if not found:
      raise ValueError(
        f"{key}: the model's module has no kernel, scale or embedding to take "
        f"this weight (it holds {sorted(module)})"
      )
    return found[0]
  return "scale" if value.ndim == 1 else "kernel"


def module_and_leaf(key: str) -> tuple[str, str] | None:
  """The module path and leaf name of PEFT state-dict ``key``, the path without PEFT's
  ``base_model.model.`` prefix and its wrappers' segments (``base_layer``, ``modules_to_save``);
  None for a key under ``original_module`` (PEFT's frozen copy of a ``modules_to_save`` module).

  Example:
    >>> module_and_leaf("base_model.model.encoder.query.base_layer.bias")
    ('encoder.query', 'bias')
    >>> module_and_leaf("base_model.model.classifier.modules_to_save.weight")
    ('classifier', 'weight')
    >>> module_and_leaf("base_model.model.classifier.original_module.weight") is None
    True
  """
  path, name = key.removeprefix(PREFIX).rsplit(".", 1)
  parts = path.split(".")
  if "original_module" in parts:
    return None
  return ".".join(p for p in parts if p not in ("base_layer", "modules_to_save")), name


def save_adapter(
  directory: str,
  params: Mapping,
  cfg: C3AConfig,
  *,
  key_map: KeyMap | None = None,
  as_lora: int | None = None,
) -> dict[str, float] | None:
  """Writes the trainable part of ``params`` as a PEFT C3A adapter into ``directory``.

  ``params`` is the full tree, the adapter from :func:`c3a_jax.split`, or an adapted NNX
  model. Each file is written atomically. ``target_modules`` of None or ``"all-linear"`` is
  saved as the list of adapted layers, so PEFT adapts exactly those.

  A stacked layer (``nn.scan``, C3A kernel ``(L, m, n, b)``) is written as ``L`` PEFT layers,
  named by :func:`c3a_jax.key_maps` rules (the index after the ``layers_pattern`` segment);
  ``key_map`` maps each module path to PEFT's name (e.g. ``c3a.key_maps.TUNIX_QWEN3``). With
  either, the saved ``target_modules`` lists the PEFT names, and ``block_size_pattern`` the
  block size of each layer that differs from ``block_size``.

  ``as_lora=r`` writes a PEFT LoRA adapter instead, for serving stacks that take LoRA only:
  each C3A layer's delta as its best rank-``r`` ``lora_A``/``lora_B`` (a truncated SVD, see
  :func:`c3a_jax.to_lora`; each part of a ``key_map`` split its own), ``lora_alpha = r`` so that
  PEFT's scale is 1, every layer named in ``target_modules``, ``modules_to_save`` and trained
  biases as for C3A (``bias="c3a_only"`` is LoRA's ``"lora_only"``). It returns each PEFT
  layer's relative error ``||delta - B A||_F / ||delta||_F``, and warns naming the worst layer
  where one is above 1e-3. One ``r`` serves all layers: a layer of full rank
  ``min(d_in, d_out)`` below ``r`` gets zero columns past it (exact).

  Returns:
    With ``as_lora``, ``{PEFT layer name: relative error}``; else None.

  Raises:
    ValueError: if ``params`` holds no C3A kernel, a tensor holds NaN or inf (or float64 values
      that overflow float32), which load_adapter would refuse: nothing is written, and the
      error names the layer and leaf; a kernel disagrees with ``cfg``'s block size,
      a layer stores its kernel ``(out, in)`` (GPT-2's Conv1D): PEFT's C3A supports
      ``torch.nn.Linear`` only and would misread it, or a layer both holds a C3A kernel and
      trains fully as ``modules_to_save`` (DistilBERT's ``pre_classifier`` under
      ``all-linear`` and ``SEQ_CLS``), which PEFT cannot load; with ``as_lora``, a rank that
      is not a positive integer or is above every layer's full rank.
  """
  key_map = key_maps.check(key_map, "save_adapter")
  if as_lora is not None:
    as_lora = _lora_export.check_rank(as_lora, "save_adapter(as_lora=...)")
  adapter = _trainable(params, cfg)
  stacks = _stacks(adapter)
  peft = _peft_tensors(adapter, stacks, cfg, key_map, as_lora)
  _check_loadable(peft, cfg)
  cfg = _peft_config(cfg, peft, renamed=bool(stacks or key_map))
  if as_lora is None:
    _publish(directory, peft.tensors, cfg)
    return None
  _lora_export.check_useful(as_lora, peft.full_ranks, "save_adapter(as_lora=...)")
  _publish(directory, peft.tensors, _lora_export.lora_config(cfg, as_lora, peft.adapted))
  _lora_export.warn_lossy(peft.errors, as_lora, "save_adapter(as_lora=...)")
  return peft.errors


def _trainable(params: Any, cfg: C3AConfig) -> Params:
  """The trainable part of ``params`` (a params tree, an adapter, or an NNX model's tree)."""
  if _nnx.is_module(params):
    params = _nnx.view(params).tree
  adapter, _ = split(params, cfg)
  return adapter


def _stacks(adapter: Params) -> dict[str, tuple[int, ...]]:
  """Each stacked C3A layer's path -> its stack axes (a kernel ``(*stack, m, n, b)``)."""
  return {
    path: _tree.shape(value)[:-3]
    for path, name, value in _tree.leaves(adapter)
    if name in C3A_LEAVES and len(_tree.shape(value)) > 3
  }


@dataclasses.dataclass
class _PeftTensors:
  """What :func:`save_adapter` gathers from the adapter: the tensors by PEFT key; the PEFT names
  of the C3A layers, in order, with their block sizes; with ``as_lora``, each one's relative
  error and full rank; and the layers PEFT could not load: kernels stored ``(out, in)``
  (``out_in``), C3A layers that also train fully (``both``)."""

  tensors: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  adapted: list[str] = dataclasses.field(default_factory=list)
  block_sizes: dict[str, int] = dataclasses.field(default_factory=dict)
  errors: dict[str, float] = dataclasses.field(default_factory=dict)
  full_ranks: list[int] = dataclasses.field(default_factory=list)
  out_in: list[str] = dataclasses.field(default_factory=list)
  both: list[str] = dataclasses.field(default_factory=list)

  def add(self, peft_name: str, name: str, value: np.ndarray, as_lora: int | None) -> None:
    """Leaf ``name`` of PEFT layer ``peft_name``; a C3A kernel as LoRA factors with ``as_lora``."""
    if name == C3A_KERNEL:
      self.adapted.append(peft_name)
      self.block_sizes[peft_name] = value.shape[-1]
      if as_lora is not None:
        # PEFT's LoRA weights are torch's (out, in) Linear layout: A (r, in), B (out, r).
        f = _lora_export.factorize(value, as_lora)
        self.errors[peft_name] = f.error
        self.full_ranks.append(f.full_rank)
        self.tensors[f"{PREFIX}{peft_name}.lora_A.weight"] = np.ascontiguousarray(f.a.T)
        self.tensors[f"{PREFIX}{peft_name}.lora_B.weight"] = np.ascontiguousarray(f.b.T)
        return
    self.tensors[f"{PREFIX}{peft_name}.{name}"] = np.ascontiguousarray(value)


def _peft_tensors(
  adapter: Params,
  stacks: Mapping[str, tuple[int, ...]],
  cfg: C3AConfig,
  key_map: KeyMap,
  as_lora: int | None,
) -> _PeftTensors:
  """Every leaf of ``adapter`` checked, in PyTorch layout, and keyed by PEFT's names: a stack
  cut into its layers, a ``key_map`` split cut by output rows."""
  peft = _PeftTensors()
  for path, name, value in _tree.leaves(adapter):
    value = np.asarray(_tree.unbox(value))
    problem = _finite_problem(value)
    if problem:
      raise ValueError(
        f"save_adapter: {path}.{name} {problem}; an adapter file holds finite float32 values "
        "(load_adapter refuses others), so nothing was written"
      )
    if name == C3A_KERNEL_OUT_IN:
      peft.out_in.append(path)
      continue
    stack = stacks.get(path, ())
    if name == C3A_KERNEL:
      if cfg.modules_to_save and trains_fully(path, cfg):
        peft.both.append(path)
      _check_kernel(path, value, stack, cfg)
    name, value = _torch_leaf(adapter, path, name, value)
    for layer, v in _peft_layers(path, name, value, stack, cfg):
      peft_names = key_maps.apply(key_map, layer)
      for peft_name, part in zip(peft_names, _split_rows(layer, name, v, peft_names), strict=True):
        peft.add(peft_name, name, part, as_lora)
  return peft


def _check_kernel(path: str, value: np.ndarray, stack: tuple[int, ...], cfg: C3AConfig) -> None:
  """Refuses a C3A kernel PEFT could not load: of another block size than ``cfg`` gives its
  layer, or stacked on more than one axis."""
  b = block_size_for(path, cfg)
  if value.ndim < 3 or value.shape[-1] != b:
    raise ValueError(
      f"save_adapter: {path}.c3a_kernel has shape {value.shape} but the config "
      f"gives layer {path!r} block size {b}; PEFT could not load it"
    )
  if len(stack) > 1:
    raise ValueError(
      f"save_adapter: {path}.c3a_kernel has shape {value.shape}, {len(stack)} stack axes; "
      "PEFT layers are numbered along one stack axis"
    )


def _torch_leaf(adapter: Params, path: str, name: str, value: np.ndarray) -> tuple[str, Any]:
  """Leaf ``name`` of module ``path`` as PEFT names and lays it out (bfloat16 as float32)."""
  if name == "bias" and any(n in _tree.get(adapter, path) for n in C3A_LEAVES):
    name = "base_layer.bias"  # PEFT wraps an adapted Linear; its own bias sits in base_layer.
  elif name != C3A_KERNEL:
    name, value = _to_torch(name, value)
  if value.dtype == jnp.bfloat16:  # numpy safetensors has no bfloat16; PEFT casts on load.
    value = value.astype(np.float32)
  return name, value


def _peft_layers(
  path: str, name: str, value: np.ndarray, stack: tuple[int, ...], cfg: C3AConfig
) -> list[tuple[str, np.ndarray]]:
  """``(layer path, value)`` of each PEFT layer a leaf is saved as: the leaf itself, or each
  layer of its stack that ``layers_to_transform`` keeps, named by :func:`layer_path`."""
  layers = [(path, value)]
  if stack:
    keep = stack_layers(path, stack[0], cfg)
    dropped = [i for i in range(stack[0]) if i not in keep]
    if name == C3A_KERNEL and np.any(value[dropped]):
      raise ValueError(
        f"save_adapter: {path}.c3a_kernel is non-zero in layers {dropped}, which "
        f"layers_to_transform={cfg.layers_to_transform!r} leaves out: PEFT adapts those "
        "layers not at all, so their training would be lost (c3a.optimizer keeps them zero)"
      )
    layers = [(layer_path(path, i, cfg), value[i]) for i in keep]
  if name == "base_layer.bias":  # a multi-axis layer's bias, as its torch Linear holds it
    layers = [(layer, v.reshape(-1)) for layer, v in layers]
  return layers


def _check_loadable(peft: _PeftTensors, cfg: C3AConfig) -> None:
  """Refuses an adapter PEFT could not load: kernels stored ``(out, in)``, no C3A layer, or a
  C3A layer that also trains fully."""
  out_in, both = peft.out_in, peft.both
  if out_in:
    raise ValueError(
      f"save_adapter: layers {out_in} store their kernel (out, in) (transformers' Conv1D, as in "
      "GPT-2). PEFT's C3A supports torch.nn.Linear only and would misread them, so no PEFT "
      "adapter was written; keep such adapters with c3a.split and orbax or np.savez."
    )
  if not peft.adapted:
    raise ValueError("save_adapter: params hold no c3a_kernel; call c3a.attach first")
  if both:
    raise ValueError(
      f"save_adapter: layers {both} hold a C3A kernel and also train fully as modules_to_save "
      f"{list(cfg.modules_to_save)} (PEFT takes every module whose name ends with an entry: "
      "'classifier' takes 'pre_classifier' too). PEFT cannot load such an adapter; attach "
      f"again with exclude_modules={both!r} (or name them out of target_modules)"
    )


def _peft_config(cfg: C3AConfig, peft: _PeftTensors, *, renamed: bool) -> C3AConfig:
  """The config as PEFT reads it: every adapted layer by name where PEFT's names differ from
  the model's (``renamed``: a stack or a key_map; each block size that differs too) or where
  PEFT would resolve ``cfg``'s targets its own way."""
  if renamed:
    # PEFT's names differ from the model's: name every layer, and each block size that differs.
    cfg = cfg.replace(
      target_modules=tuple(peft.adapted),
      exclude_modules=None,
      layers_to_transform=None,
      layers_pattern=None,
      block_size_pattern={k: b for k, b in peft.block_sizes.items() if b != cfg.block_size},
    )
  elif cfg.target_modules is None or cfg.target_modules == "all-linear" or cfg.exclude_modules:
    # PEFT would resolve these its own way (and 0.21 has no exclude_modules): name the layers.
    cfg = cfg.replace(target_modules=tuple(peft.adapted), exclude_modules=None)
  if "" in peft.adapted:
    raise ValueError(
      "save_adapter: the C3A layer sits at the params root, so it has no module "
      "name for PEFT; nest the params under the layer's name"
    )
  return cfg


def _publish(directory: str, tensors: dict[str, np.ndarray], config: Any) -> None:
  """The adapter's files, published with :func:`c3a_jax.io.publish_directory`: ``config`` is a
  :class:`C3AConfig`, or a LoRA adapter_config.json's fields."""
  with publish_directory(directory) as into:
    # In an existing directory each file is replaced on its own: the config goes last, as it is
    # what readers open first.
    atomic_write(os.path.join(into, WEIGHTS_NAME), safetensors.numpy.save(tensors))
    if isinstance(config, C3AConfig):
      config.save(into)
    else:
      data = json.dumps(config, indent=2, sort_keys=True).encode()
      atomic_write(os.path.join(into, CONFIG_NAME), data)


def _split_rows(layer: str, name: str, value: np.ndarray, names: tuple[str, ...]) -> list:
  """``value`` of ``layer`` cut by output rows into one part per PEFT name (a key_map split)."""
  if len(names) == 1:
    return [value]
  if name not in (C3A_KERNEL, "base_layer.bias"):
    raise ValueError(
      f"save_adapter: key_map splits layer {layer!r} into {list(names)}, but only a C3A "
      f"layer's c3a_kernel and bias split by output rows, not its {name!r}"
    )
  if value.shape[0] % len(names):
    rows = f"{value.shape[0]} blocks of {value.shape[-1]} outputs"
    raise ValueError(
      f"save_adapter: key_map splits layer {layer!r} into {len(names)} parts {list(names)}, "
      f"but its {rows if name == C3A_KERNEL else f'{value.shape[0]} outputs'} do not split "
      "evenly; the block size must divide each part's width"
    )
  return np.split(value, len(names))


def _finite_problem(value: np.ndarray) -> str | None:
  """Why ``value`` is no adapter tensor that PEFT and c3a-jax read alike, or None: it holds
  non-finite values, or values that become inf as float32. PEFT's models and C3A kernels are
  float32, so a float64 1e300 is checked as the float32 it is read as, not before the cast."""
  bad = int((~np.isfinite(value)).sum())
  if bad:
    return f"holds {bad} non-finite value{'s' if bad != 1 else ''}"
  if np.issubdtype(value.dtype, np.floating) and value.dtype.itemsize > 4:
    with np.errstate(over="ignore"):
      over = int(np.isinf(value.astype(np.float32)).sum())
    if over:
      largest = float(np.abs(value).max())
      return f"holds {over} values that overflow float32 (largest magnitude {largest:.3g})"
  return None


def _check_tensor(where: str, path: str, name: str, value: np.ndarray, cfg: C3AConfig) -> None:
  """Refuses a tensor PEFT would read differently: PEFT drops tensors its config does not
  ask for without a word, so loading them here would make the two compute different models."""
  if name not in (C3A_KERNEL, "weight", "bias"):
    raise ValueError(
      f"{where}: {name!r} is no tensor of a C3A adapter (c3a_kernel, or the weight or bias "
      "of a module it trains); is this another kind of PEFT adapter?"
    )
  if not np.issubdtype(value.dtype, np.floating):
    raise ValueError(f"{where} has dtype {value.dtype}; adapter weights are floating point")
  problem = _finite_problem(value)
  if problem:
    raise ValueError(f"{where} {problem}")
  targeted = named_target(path, cfg)
  if name == C3A_KERNEL and targeted is False:
    raise ValueError(
      f"{where}: layer {path!r} is not in the file's own target_modules "
      f"({cfg.target_modules!r}); PEFT would skip this tensor"
    )
  heads = bool(cfg.modules_to_save) and trains_fully(path, cfg)
  if name == "weight" and not heads:
    raise ValueError(
      f"{where}: module {path!r} is not in modules_to_save ({cfg.modules_to_save!r}), "
      "so PEFT would skip this weight"
    )
  if name == "bias" and not (
    heads or cfg.bias == "all" or (cfg.bias == "c3a_only" and targeted is not False)
  ):
    raise ValueError(f"{where}: with bias={cfg.bias!r}, PEFT would skip this bias of {path!r}")


class _Place(NamedTuple):
  """Where a PEFT module's tensors go: a module of the model, a layer of its stack (or None),
  and the part of its output rows (of ``parts``, a key_map split); for a stack's layer, how
  many segments of ``path`` precede the index in the name (``at``)."""

  path: str
  index: int | None = None
  part: int = 0
  parts: int = 1
  at: int | None = None


def _places(
  key_map: KeyMap,
  path: str,
  index: int | None = None,
  name: str | None = None,
  at: int | None = None,
) -> dict[str, _Place]:
  names = key_maps.apply(key_map, path if name is None else name)
  return {n: _Place(path, index, j, len(names), at) for j, n in enumerate(names)}


def _model_names(params: Mapping, key_map: KeyMap) -> dict[str, _Place]:
  """PEFT's name of every module of ``params`` -> where its tensors go."""
  return {n: s for path, _ in _tree.modules(params) for n, s in _places(key_map, path).items()}


def _layer_names(params: Mapping, key_map: KeyMap) -> dict[str, _Place]:
  """PEFT's name of each layer of every layer that may be a stack (a kernel of 3 or more axes)
  -> where its tensors go: the index inserted after any one segment, so that the name is
  found wherever the saver put it. Built only when a file names a module the model lacks: it
  is large (a DenseGeneral's leading axis is a width)."""
  names: dict[str, _Place] = {}
  for path, node in _tree.modules(params):
    shape = _tree.shape(node.get("kernel")) if is_linear(node) else ()
    if len(shape) < 3:
      continue
    parts = path.split(".")
    for at in range(1, len(parts) + 1):
      for i in range(shape[0]):
        layer = ".".join([*parts[:at], str(i), *parts[at:]])
        for n, place in _places(key_map, path, i, layer, at).items():
          names.setdefault(n, place)
  return names


def _stack_layer(path: str, at: int, index: int) -> str:
  """The name of layer ``index`` of the stack at ``path``, the index after ``at`` segments."""
  parts = path.split(".")
  return ".".join([*parts[:at], str(index), *parts[at:]])


def _expected(
  path: str, node: Mapping, cfg: C3AConfig, key_map: KeyMap, at: int | None, stacked: bool
) -> list[tuple[str, _Place]]:
  """Each PEFT name a file may hold a C3A kernel of the model's layer ``path`` under, with where
  it goes: the layer's own names, or, for a stack, each of its layers' (the index after ``at``
  segments, or where :func:`save_adapter` puts it)."""
  if not stacked:
    return list(_places(key_map, path).items())
  out = []
  for i in range(_tree.shape(node["kernel"])[0]):
    layer = layer_path(path, i, cfg) if at is None else _stack_layer(path, at, i)
    out.extend(_places(key_map, path, i, layer, at).items())
  return out


def _missing_layers(
  params: Mapping,
  cfg: C3AConfig,
  key_map: KeyMap,
  adapter: Params,
  pieces: Mapping[tuple[str, str], tuple[dict, int]],
  stacked_at: Mapping[str, int | None],
) -> list[tuple[str, _Place]]:
  """Each layer of the model that the file's own config targets by name, as PEFT reads it, but
  whose C3A kernel the file lacks (PEFT name, where it goes). PEFT gives such a layer a fresh
  kernel. A stack's layers are named as the file names its other layers; a stack it holds
  nothing of, as the file's other stacks (a file without stacks has none to check)."""
  if named_target("", cfg) is None:
    return []  # all-linear or the model type's defaults: only a model's classes would say
  missing = []
  for path, node in _tree.modules(params):
    if not is_linear(node):
      continue
    got, _ = pieces.get((path, C3A_KERNEL), ({}, 1))
    if not got and any(n in _leaves_at(adapter, path) for n in C3A_LEAVES):
      continue  # held whole
    if got:
      stacked = path in stacked_at
      candidates = _expected(path, node, cfg, key_map, stacked_at.get(path), stacked)
    else:
      candidates = _expected(path, node, cfg, key_map, None, False)
      if stacked_at and len(_tree.shape(node["kernel"])) >= 3:
        at = next(iter(stacked_at.values()))
        candidates += _expected(path, node, cfg, key_map, at, True)
    for name, place in candidates:
      if (place.index, place.part) not in got and named_target(name, cfg):
        missing.append((name, place))
        break  # one name per layer of the model says it
  return missing


def _leaves_at(tree: Mapping, path: str) -> Mapping:
  try:
    node = _tree.get(tree, path)
  except KeyError:
    return {}
  return node if isinstance(node, Mapping) else {}


def _describe(place: _Place) -> str:
  """Which part of the model a PEFT layer is, where it is not a whole layer of its own."""
  part = f"part {place.part + 1} of {place.parts} of " if place.parts > 1 else ""
  if place.index is not None:
    return f" ({part}layer {place.index} of the stack {place.path!r})"
  return f" ({part}layer {place.path!r}, split by key_map)" if part else ""


def load_adapter(
  directory: str, params: Any = None, *, key_map: KeyMap | None = None
) -> tuple[Any, C3AConfig]:
  """Reads a PEFT C3A adapter (saved by PEFT or :func:`save_adapter`) as ``(adapter, cfg)``.

  Pass the model's ``params`` to check every key and shape against the model (and to place
  ``modules_to_save`` weights exactly); then ``c3a.combine(adapter, params)`` runs it. Pass an
  NNX model instead, and the first result is that model adapted (the input is untouched). PEFT's
  extra keys are understood: ``<layer>.base_layer.bias`` (the bias of an adapted layer) and,
  with ``bias="all"``, the copies under ``modules_to_save.`` and ``original_module.``.

  Stacked layers (``nn.scan``) read back into their stack: PEFT's layers ``layers.0.attn.q``
  ... ``layers.{L-1}.attn.q`` become the ``(L, m, n, b)`` kernel of ``layers.attn.q`` (this
  needs ``params``). ``key_map`` is the map :func:`save_adapter` took, from the model's module
  paths to PEFT's names; it too needs ``params``, as the map is read backwards through them.

  Tensors PEFT would read differently are refused, naming the key and the reason: integer or
  non-finite values, a C3A kernel of a layer the file's own ``target_modules`` leave out, a
  weight outside ``modules_to_save``, a bias ``bias`` does not train, or a tensor no C3A
  adapter has (``lora_A``). PEFT would drop the latter silently, computing another model.
  Tensors are checked as the float32 they are read as: a float64 ``1e300`` overflows.

  With the model (``params`` or an NNX model), a file that lacks the C3A kernel of a layer its
  own ``target_modules`` select in that model is refused too, naming the layer (the first, and
  how many more): PEFT would give that layer a fresh random kernel, so the two libraries would
  compute different models from one file. Without the model the targets are unknown and the
  file loads as it is (``combine`` checks shapes, not targets): pass the model to check it.

  Raises:
    FileNotFoundError: a file is missing.
    ValueError: the directory is not a C3A adapter, a file is not UTF-8 or valid JSON, a tensor
      is refused or a targeted layer missing (above), or its keys or shapes do not fit
      ``params``.
  """
  if _nnx.is_module(params):
    return _load_into_nnx(directory, params, key_map)
  key_map = key_maps.check(key_map, "load_adapter")
  if key_map and params is None:
    raise ValueError(
      "load_adapter: key_map needs the model's params, to find the module each PEFT name "
      "maps to: load_adapter(directory, params, key_map=...)"
    )
  cfg, weights, tensors = _read_files(directory)
  loaded = _map_keys(tensors, weights, cfg, params, key_map)
  if not any(name in C3A_LEAVES for _, name, _ in _tree.leaves(loaded.adapter)):
    raise ValueError(f"load_adapter: {weights} holds no c3a_kernel tensors; not a C3A adapter")
  if params is not None:
    _check_against_model(directory, weights, params, cfg, key_map, loaded)
  return loaded.adapter, cfg


def _load_into_nnx(directory: str, model: Any, key_map: KeyMap | None) -> tuple[Any, C3AConfig]:
  """A copy of NNX ``model`` adapted by the adapter in ``directory`` (the input is untouched)."""
  model = nnx.clone(model)
  view = _nnx.view(model)
  adapter, cfg = load_adapter(directory, view.tree, key_map=key_map)
  view.write(adapter)
  return model, cfg


def _read_files(directory: str) -> tuple[C3AConfig, str, dict[str, np.ndarray]]:
  """The adapter's config, the path of its weights file, and the tensors in that file."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"load_adapter: {directory} is not a directory")
  cfg = C3AConfig.load(directory)
  weights = os.path.join(directory, WEIGHTS_NAME)
  if not os.path.isfile(weights):
    hint = (
      " (only adapter_model.bin is there: re-save it with PEFT's safe_serialization=True)"
      if os.path.isfile(os.path.join(directory, "adapter_model.bin"))
      else ""
    )
    raise FileNotFoundError(f"load_adapter: {weights} does not exist{hint}")
  try:
    tensors = safetensors.numpy.load_file(weights)
  except Exception as e:  # safetensors raises its own error types for corrupt files.
    raise ValueError(f"load_adapter: {weights} is not a readable safetensors file: {e}") from None
  return cfg, weights, tensors


class _Locator:
  """Where each PEFT module's tensors go in the model's ``params`` (as named, without them).

  The names of a stack's layers are built only when a file names a module the model lacks: they
  are many (a DenseGeneral's leading axis is a width)."""

  def __init__(self, params: Mapping | None, key_map: KeyMap):
    self.params, self.key_map = params, key_map
    self.names = None if params is None else _model_names(params, key_map)
    self.expanded = False

  def __call__(self, path: str, where: str) -> tuple[_Place, Mapping | None]:
    """Where PEFT module ``path``'s tensors go, and the model's module there (None without
    the model); ``where`` names the key in errors."""
    if self.names is None:
      return _Place(path), None
    if path not in self.names and not self.expanded:
      # A module's own name comes first.
      self.names = {**_layer_names(self.params, self.key_map), **self.names}
      self.expanded = True
    if path not in self.names:
      try:
        _tree.get(self.params, path)
      except KeyError as e:
        mapped = " under key_map" if self.key_map else ""
        raise ValueError(
          f"{where} names module {path!r}, which the model does not have{mapped} (no {e.args[0]!r})"
        ) from None
    place = self.names.get(path, _Place(path))
    return place, _tree.get(self.params, place.path)


@dataclasses.dataclass
class _Loaded:
  """What :func:`load_adapter` reads: the adapter tree; the pieces of leaves that a stack or a
  key_map split cut up, ``(module path, leaf) -> ({(stack index or None, part): tensor},
  parts)``; and each stack's path -> how many segments precede its index in PEFT's names."""

  adapter: Params = dataclasses.field(default_factory=dict)
  pieces: dict[tuple[str, str], tuple[dict, int]] = dataclasses.field(default_factory=dict)
  stacked_at: dict[str, int | None] = dataclasses.field(default_factory=dict)

  def add(self, place: _Place, name: str, value: np.ndarray, module: Mapping | None) -> None:
    """Leaf ``name`` of the PEFT module at ``place``: whole, or one piece of a leaf."""
    if place.index is None and place.parts == 1:
      _tree.set_leaf(self.adapter, place.path, name, _like(value, module, name, None))
      return
    got = self.pieces.setdefault((place.path, name), ({}, place.parts))[0]
    got[(place.index, place.part)] = value
    if place.index is not None and name == C3A_KERNEL:
      self.stacked_at.setdefault(place.path, place.at)

  def assemble(self, params: Mapping, weights: str) -> None:
    """Each cut-up leaf joined from its pieces into the adapter (:func:`_assemble`)."""
    for (path, name), (got, parts) in self.pieces.items():
      leaf = _assemble(got, parts, name, _tree.get(params, path), f"{weights}: layer {path!r}")
      _tree.set_leaf(self.adapter, path, name, leaf)


def _map_keys(
  tensors: Mapping[str, np.ndarray],
  weights: str,
  cfg: C3AConfig,
  params: Mapping | None,
  key_map: KeyMap,
) -> _Loaded:
  """Each tensor of the file checked, as the Flax leaf it is, at its place in the model."""
  locate = _Locator(params, key_map)
  loaded = _Loaded()
  for key, value in tensors.items():
    where = f"{weights}: key {key!r}"
    if not key.startswith(PREFIX) or key.count(".") < 3:
      raise ValueError(f"{where} is not a PEFT adapter key ({PREFIX}<module path>.<name>)")
    module_leaf = module_and_leaf(key)
    if module_leaf is None:
      continue  # PEFT's frozen copy of a modules_to_save module (saved under bias="all")
    path, name = module_leaf
    place, module = locate(path, where)
    name, value = _flax_leaf(where, path, name, value, cfg, place, module)
    loaded.add(place, name, value, module)
  loaded.assemble(params, weights)
  return loaded


def _flax_leaf(
  where: str,
  path: str,
  name: str,
  value: np.ndarray,
  cfg: C3AConfig,
  place: _Place,
  module: Mapping | None,
) -> tuple[str, np.ndarray]:
  """Tensor ``name`` of PEFT module ``path`` checked (:func:`_check_tensor`, its block size),
  as the Flax leaf it is: its name and layout."""
  _check_tensor(where, path, name, value, cfg)
  if name == C3A_KERNEL:
    b = block_size_for(path, cfg)
    if value.ndim != 3 or value.shape[2] != b:
      raise ValueError(
        f"{where} has shape {value.shape}; adapter_config.json gives block "
        f"size {b}, so (d_out // {b}, d_in // {b}, {b}) was expected"
      )
  else:
    name = _from_torch(name, value, module, where)
    if name == "kernel":
      value = _kernel_from_torch(value)
  if place.parts > 1 and name not in (C3A_KERNEL, "bias"):
    raise ValueError(
      f"{where}: key_map makes {path!r} part {place.part + 1} of {place.parts} of layer "
      f"{place.path!r}; only a c3a_kernel or a bias joins by output rows"
    )
  return name, value


def _check_against_model(
  directory: str,
  weights: str,
  params: Mapping,
  cfg: C3AConfig,
  key_map: KeyMap,
  loaded: _Loaded,
) -> None:
  """Refuses an adapter whose keys or shapes do not fit ``params``, or that lacks the C3A
  kernel of a layer its own target_modules select in them (:func:`_missing_layers`)."""
  try:
    combine(loaded.adapter, params)
  except ValueError as e:
    raise ValueError(f"load_adapter({directory}): {e}") from None
  missing = _missing_layers(params, cfg, key_map, loaded.adapter, loaded.pieces, loaded.stacked_at)
  if missing:
    (name, place), more = missing[0], [n for n, _ in missing[1:]]
    also = f" (and {len(more)} more: {brief(more)})" if more else ""
    raise ValueError(
      f"load_adapter: {weights} holds no c3a_kernel for layer {name!r}{_describe(place)}, "
      f"which its target_modules {brief(cfg.target_modules)} select in this model{also}. "
      "PEFT would give such a layer a fresh random kernel, so the two libraries would compute "
      "different models from this file: is it cut short, or for another model?"
    )


def _assemble(got: dict, parts: int, name: str, module: Mapping, where: str) -> jax.Array:
  """A leaf from its PEFT pieces ``{(stack index or None, part): tensor}``: a layer's parts
  joined by output rows (a key_map split), a stack's layers stacked. What the file leaves out
  is unadapted, as in PEFT's model: a zero C3A kernel, the base's own values otherwise (a layer
  its target_modules select but it lacks is refused after, by :func:`_missing_layers`)."""
  shapes = {v.shape for v in got.values()}
  if len(shapes) > 1:
    raise ValueError(
      f"{where}: its {parts} parts (a key_map split) or stacked layers have {name}s of "
      f"shapes {sorted(shapes)}; they join only with one shape (one block size)"
    )
  stacked = next(iter(got))[0] is not None
  own = None if name == C3A_KERNEL else np.asarray(_tree.unbox(module[name]))

  def part(i: int | None, p: int) -> np.ndarray:
    if (i, p) in got:
      v = got[(i, p)]
    elif own is None:
      v = np.zeros_like(next(iter(got.values())))
    else:
      base = own if i is None else own[i]
      v = np.split(base.reshape(-1) if name == "bias" else base, parts)[p]
    return v.reshape(-1) if name == "bias" else v

  def layer(i: int | None) -> jax.Array:
    return _like(np.concatenate([part(i, p) for p in range(parts)]), module, name, i)

  if not stacked:
    return layer(None)
  return jnp.stack([layer(i) for i in range(_tree.shape(module["kernel"])[0])])


def _like(value: np.ndarray, module: Mapping | None, name: str, index: int | None) -> jax.Array:
  """``value`` shaped as the model's leaf (a torch Linear's flat bias for a multi-axis layer)."""
  if module is not None and name == "bias" and name in module:
    shape = _tree.shape(module[name])[0 if index is None else 1 :]
    if math.prod(shape) == value.size:
      value = value.reshape(shape)
  return jnp.asarray(value)
