"""Which Dense layers of a params tree a C3AConfig selects, with their block sizes.

Module paths are params-tree paths joined with dots; for Hugging Face Flax models they equal the
PyTorch module names, so PEFT's matching rules (0.21) apply unchanged.

Example:
  >>> import numpy as np, c3a_jax as c3a
  >>> params = {"attn": {"query": {"kernel": np.zeros((8, 8)), "bias": np.zeros(8)},
  ...                    "key": {"kernel": np.zeros((8, 8)), "bias": np.zeros(8)}}}
  >>> [t.path for t in c3a.select(params, c3a.C3AConfig(block_size=4, target_modules=["query"]))]
  ['attn.query']
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from c3a_jax import _nnx, _tree
from c3a_jax._config import C3AConfig
from c3a_jax._layout import Layout
from c3a_jax._probe import LayerShape, probe

# PEFT's TRANSFORMERS_MODELS_TO_C3A_TARGET_MODULES_MAPPING for the models transformers has in Flax.
# ViT is not in PEFT's table; c3a-jax adds it (its attention is named like BERT's).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
  **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "vit"), ("query", "value")),
  **dict.fromkeys(
    ("llama", "mistral", "gemma", "qwen2", "opt", "gptj", "gpt_neo", "bart"), ("q_proj", "v_proj")
  ),
  **dict.fromkeys(("t5", "mt5"), ("q", "v")),
  "bloom": ("query_key_value",),
  "gpt2": ("mlp.c_proj",),
}
# Layers whose kernel is stored (out, in) rather than Flax's (in, out): transformers' FlaxConv1D.
OUT_IN_LAYERS: dict[str, tuple[str, ...]] = {"gpt2": ("c_attn", "c_proj", "c_fc")}
# Output layers that "all-linear" leaves alone (PEFT skips the output embedding and SEQ_CLS heads).
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")


def default_targets(model_type: str | None) -> tuple[str, ...]:
  """PEFT's default ``target_modules`` for a Hugging Face ``model_type``: what a
  :class:`~c3a_jax.C3AConfig` with ``target_modules=None`` selects.

  Example:
    >>> import c3a_jax as c3a
    >>> c3a.default_targets("llama")
    ('q_proj', 'v_proj')
    >>> c3a.default_targets("resnet")
    Traceback (most recent call last):
    ...
    ValueError: model_type='resnet' has no default targets (known: bart, ...); pass target_modules
  """
  if model_type not in DEFAULT_TARGETS:
    known = ", ".join(sorted(DEFAULT_TARGETS))
    raise ValueError(
      f"model_type={model_type!r} has no default targets (known: {known}); pass target_modules"
    )
  return DEFAULT_TARGETS[model_type]


class UnmatchedTargetWarning(UserWarning):
  """A ``target_modules`` or ``exclude_modules`` list entry names no module of the params: most
  likely a typo, which would otherwise leave a layer unadapted (or not excluded) without a word.

  ``field`` says which list, ``entries`` the entries. The ``c3a-jax`` command makes it an error;
  a library user may too: ``warnings.simplefilter("error", c3a.UnmatchedTargetWarning)``.
  """

  def __init__(self, message: str, field: str = "", entries: tuple[str, ...] = ()):
    super().__init__(message)
    self.field = field
    self.entries = entries


@dataclasses.dataclass(frozen=True)
class Target:
  """One selected layer: its path, block size, and how its kernel lies (:class:`Layout`)."""

  path: str
  block_size: int
  layout: Layout
  layers: tuple[int, ...] | None = None  # of a stack, the layers adapted (None: all)

  @property
  def d_in(self) -> int:
    return self.layout.d_in

  @property
  def d_out(self) -> int:
    return self.layout.d_out

  @property
  def out_in(self) -> bool:
    """The kernel is stored ``(d_out, d_in)``, as FlaxConv1D does."""
    return self.layout.out_in

  @property
  def shape(self) -> tuple[int, ...]:
    """The C3A kernel's shape ``(*stack, d_out // b, d_in // b, b)``."""
    return self.layout.c3a_shape(self.block_size)


def is_linear(node: Any) -> bool:
  """A layer holding a ``kernel`` of 2 or more axes beside array leaves only."""
  return (
    isinstance(node, Mapping)
    and "kernel" in node
    and len(_tree.shape(node["kernel"])) >= 2
    and not any(isinstance(v, Mapping) for v in node.values())
  )


def is_dense(node: Any) -> bool:
  """A Dense-like module: a 2-D ``kernel`` beside array leaves only."""
  return is_linear(node) and len(_tree.shape(node["kernel"])) == 2


def in_modules_to_save(path: str, cfg: C3AConfig) -> bool:
  """Whether ``path`` lies in a ``modules_to_save`` entry, so it is never a C3A target.

  PEFT's target check: the entry is a whole run of dotted segments of the path.
  """
  return any(re.match(rf"(^|.*\.){m}($|\..*)", path) for m in cfg.modules_to_save or ())


def trains_fully(path: str, cfg: C3AConfig) -> bool:
  """Whether module ``path`` is (inside) a module PEFT wraps as ``modules_to_save``.

  PEFT's ``_set_trainable`` wraps every module whose name ends with an entry, as plain
  strings: ``"norm"`` takes Llama's ``input_layernorm`` too. Kept as is, so both train the same.
  """
  parts = path.split(".")
  prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)] if path else []
  return any(p.endswith(m) for p in prefixes for m in cfg.modules_to_save or ())


def _ends_with(path: str, names: tuple[str, ...]) -> bool:
  return any(path == n or path.endswith("." + n) for n in names)


def _layer_index(path: str, pattern: tuple[str, ...] | str | None) -> int | None:
  if not pattern:
    # Lazy: the first numbered segment is the layer, not e.g. an expert index nested in it.
    match = re.match(r".*?\.[^.]*\.(\d+)\.", path)
  else:
    patterns = (pattern,) if isinstance(pattern, str) else pattern
    match = next(
      filter(None, (re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", path) for p in patterns)), None
    )
  return int(match.group(1)) if match else None


def layer_path(path: str, index: int, cfg: C3AConfig) -> str:
  """The module path of layer ``index`` of the stacked layer at ``path``: the index follows the
  first segment ``cfg.layers_pattern`` names, else the path's first segment
  (``"layers.attn.q"`` -> ``"layers.3.attn.q"``)."""
  parts = path.split(".")
  patterns = cfg.layers_pattern or ()
  patterns = (patterns,) if isinstance(patterns, str) else patterns
  at = next((i for i, seg in enumerate(parts) if seg in patterns), 0)
  return ".".join([*parts[: at + 1], str(index), *parts[at + 1 :]])


def _matches(
  path: str, linear: bool, cfg: C3AConfig, targets: Any, *, by_layer: bool = True
) -> bool:
  """PEFT 0.21's check_target_module_exists, on a params-tree path (``by_layer=False``: all
  but its ``layers_to_transform`` check)."""
  if isinstance(cfg.exclude_modules, str):
    if re.fullmatch(cfg.exclude_modules, path):
      return False
  elif cfg.exclude_modules and _ends_with(path, cfg.exclude_modules):
    return False
  if in_modules_to_save(path, cfg):
    return False
  if targets == "all-linear":
    return linear and not any(seg in HEAD_NAMES for seg in path.split("."))
  if isinstance(targets, str):
    return re.fullmatch(targets, path) is not None
  if path in targets:
    return True
  if not _ends_with(path, targets):
    return False
  return not by_layer or _in_layers(path, cfg)


def _in_layers(path: str, cfg: C3AConfig) -> bool:
  layers = cfg.layers_to_transform
  if layers is None or layers == ():
    return True
  index = _layer_index(path, cfg.layers_pattern)
  if index is None:
    return False
  return index == layers if isinstance(layers, int) else index in layers


def stack_layers(path: str, n_layers: int, cfg: C3AConfig) -> tuple[int, ...]:
  """The layers of the stack at ``path`` that ``cfg.layers_to_transform`` adapts: the stack
  index is the layer index, read from the path :func:`layer_path` gives each layer."""
  return tuple(i for i in range(n_layers) if _in_layers(layer_path(path, i, cfg), cfg))


def named_target(path: str, cfg: C3AConfig) -> bool | None:
  """Whether ``cfg`` targets the layer at ``path`` by its name alone, as PEFT decides which
  saved tensors to load; None where that takes the model (``all-linear``, or the model type's
  default targets)."""
  if cfg.target_modules is None or cfg.target_modules == "all-linear":
    return None
  return _matches(path, False, cfg, cfg.target_modules)


def _pattern_key(path: str, cfg: C3AConfig) -> str | None:
  # PEFT: the first key with re.match(rf".*\.{key}$", path), else the whole path as a key.
  key = next((k for k in cfg.block_size_pattern if re.match(rf".*\.{k}$", path)), path)
  return key if key in cfg.block_size_pattern else None


def block_size_for(path: str, cfg: C3AConfig) -> int:
  """The first ``block_size_pattern`` key matching ``path`` (or equal to it), else
  ``block_size``."""
  key = _pattern_key(path, cfg)
  return cfg.block_size if key is None else cfg.block_size_pattern[key]


def _divisors(a: int, b: int) -> list[int]:
  g = math.gcd(a, b)
  return [d for d in range(1, g + 1) if g % d == 0]


def _layout(
  path: str, node: Mapping, traced: Mapping[str, LayerShape] | None, out_in: bool
) -> Layout:
  """How ``node``'s kernel lies: from the trace where there is one, else a 2-D kernel is a
  Dense ``(d_in, d_out)`` (``(d_out, d_in)`` with ``out_in``)."""
  shape = _tree.shape(node["kernel"])
  seen = (traced or {}).get(path)
  if seen is not None:
    if seen.problem:
      raise ValueError(
        f"C3A target {path!r} ({seen.layer_class}, kernel {seen.shape}): {seen.problem}"
      )
    n_stack = len(shape) - len(seen.shape)
    if n_stack < 0 or shape[n_stack:] != seen.shape:
      raise ValueError(
        f"C3A target {path!r}: its kernel is {shape} in the params but {seen.shape} in each "
        "call, so it is stacked on an axis other than the leading ones; c3a adapts layers "
        "stacked on leading axes (nn.scan / nn.vmap with variable_axes={'params': 0})"
      )
    return Layout(shape[:n_stack], seen.shape, seen.n_in, seen.out_in)
  if len(shape) == 2:
    return Layout((), shape, 1, out_in)
  why = (
    "forward did not call it"
    if traced is not None
    else "from the params alone c3a cannot tell a stacked Dense (L, d_in, d_out) from a "
    "DenseGeneral (d_in, heads, head_dim); pass forward=lambda p: model.apply({'params': p}, x) "
    "so c3a traces the model once (abstractly, no FLOPs) and reads each layer's axes"
  )
  raise ValueError(f"C3A target {path!r} has a {len(shape)}-D kernel {shape}: {why}")


def select(
  params: Mapping,
  cfg: C3AConfig,
  *,
  model_type: str | None = None,
  forward: Callable[[Any], Any] | None = None,
) -> list[Target]:
  """The layers ``cfg`` adapts in ``params``, in tree order.

  Args:
    params: a Flax params tree (the ``"params"`` collection), boxed or not; or a Flax NNX model,
      whose layers say their own axes.
    cfg: the C3A config.
    model_type: e.g. ``model.config.model_type`` for a Hugging Face model; gives PEFT's default
      targets when ``cfg.target_modules`` is None, and tells which layers store their kernel
      ``(out, in)`` (GPT-2's Conv1D).
    forward: runs the model on a params tree, e.g. ``lambda p: model.apply({"params": p}, x)``.
      Needed where kernels have more than 2 axes (``nn.DenseGeneral``, ``nn.Einsum``,
      ``nn.MultiHeadDotProductAttention``, layers stacked by ``nn.scan`` or ``nn.vmap``): c3a
      traces it once with :func:`jax.eval_shape` to learn which kernel axes are stacked, "in"
      and "out". Without it, every target must be a 2-D Dense.

  Each entry of a ``target_modules`` or ``exclude_modules`` list is a name suffix: it must name
  some module of ``params`` (its path, or the path's last dot-separated segments), else an
  :class:`UnmatchedTargetWarning` names it (with the nearest name there), as a typo would
  otherwise adapt the other entries' layers alone without a word. An entry that names only
  modules excluded or in ``modules_to_save`` matched them, so it is not warned about. A string
  is a regex over whole paths: whether each alternative matched cannot be told, so strings are
  not checked (nor the model type's default targets, which the user did not write).

  Raises:
    ValueError: naming the layer, its shape and the block size, when a target is not a layer C3A
      adapts or a block size does not divide its sizes; when nothing matches; when a
      ``block_size_pattern`` key matches no target.
  """
  if _nnx.is_module(params):
    model = _nnx.view(params)
    return _select(model.tree, cfg, model_type, model.layers)
  return _select(params, cfg, model_type, None if forward is None else probe(forward, params))


def _select(
  params: Mapping, cfg: C3AConfig, model_type: str | None, traced: Mapping[str, LayerShape] | None
) -> list[Target]:
  targets = _targets_of(cfg, model_type)
  out_in_names = OUT_IN_LAYERS.get(model_type, ())
  selected = []
  unknown = []  # multi-axis kernels all-linear cannot classify without a trace
  root = [("", params)] if is_linear(params) else []  # a bare layer's params
  for path, node in [*root, *_tree.modules(params)]:
    seen = (traced or {}).get(path)
    linear = is_dense(node) if seen is None else seen.problem is None
    # A stack's path has no layer index: layers_to_transform picks its layers below.
    maybe_stack = is_linear(node) and len(_tree.shape(node["kernel"])) >= 3
    if not _matches(path, linear, cfg, targets, by_layer=not maybe_stack):
      if targets == "all-linear" and traced is None and is_linear(node) and not linear:
        unknown.append(path)
      continue
    _check_linear(path, node, targets)
    out_in = _ends_with(path, out_in_names)
    if model_type is None and _ends_with(path, OUT_IN_LAYERS["gpt2"]) and seen is None:
      warnings.warn(
        f"layer {path!r} is named like GPT-2's Conv1D, whose kernel is stored "
        "(out, in); if this is GPT-2, pass model_type='gpt2' or merge will be wrong",
        stacklevel=3,
      )
    target = _target(path, node, cfg, _layout(path, node, traced, out_in), maybe_stack)
    if target is not None:
      selected.append(target)
  if unknown:
    warnings.warn(
      f"target_modules='all-linear' leaves out {unknown[:8]}{' ...' if len(unknown) > 8 else ''}: "
      "their kernels have more than 2 axes, which from the params alone may be convolutions or "
      "multi-axis / stacked linear layers; pass forward=lambda p: model.apply({'params': p}, x) "
      "to attach so c3a tells them apart and adapts the linear ones",
      stacklevel=3,
    )
  if not selected:
    linear = [p for p, n in _tree.modules(params) if is_linear(n)]
    raise ValueError(
      f"target_modules={targets!r} matched no layer. Layers here include: {linear[:8]}"
      + (" ..." if len(linear) > 8 else "")
    )
  _warn_unmatched(params, cfg)
  _check_pattern_keys(cfg, selected)
  return selected


def _targets_of(cfg: C3AConfig, model_type: str | None) -> str | tuple[str, ...]:
  """``cfg.target_modules``, or the model type's default targets where it is None."""
  if cfg.target_modules is not None:
    return cfg.target_modules
  try:
    return default_targets(model_type)
  except ValueError as e:
    raise ValueError(f"C3AConfig.target_modules is None and {e}, e.g. ['query', 'value']") from None


def _check_linear(path: str, node: Any, targets: Any) -> None:
  if not is_linear(node):
    leaves = {
      k: (_tree.shape(v) if not isinstance(v, Mapping) else "{...}") for k, v in node.items()
    }
    raise ValueError(
      f"C3A target {path!r} (matched by target_modules={targets!r}) is not a linear layer: it "
      f"holds {leaves}. C3A adapts layers with a 'kernel' (nn.Dense, nn.DenseGeneral, "
      "nn.Einsum); narrow target_modules."
    )


def _target(
  path: str, node: Mapping, cfg: C3AConfig, layout: Layout, maybe_stack: bool
) -> Target | None:
  """The matched linear layer at ``path`` as a target, None where the config's layers leave
  it out; a ValueError where its stack or sizes do not fit the config."""
  layers = None
  if layout.stack and cfg.layers_to_transform not in (None, ()):
    if len(layout.stack) > 1:
      raise ValueError(
        f"layers_to_transform: layer {path!r} is stacked on {len(layout.stack)} axes "
        f"{layout.stack}; layer indices number one stack axis"
      )
    layers = stack_layers(path, layout.stack[0], cfg)
    if not layers:
      return None
    layers = None if len(layers) == layout.stack[0] else layers
  elif maybe_stack and not _in_layers(path, cfg):
    return None
  b = block_size_for(path, cfg)
  if layout.d_in % b or layout.d_out % b:
    raise ValueError(
      f"block size {b} does not divide layer {path!r}: kernel {_tree.shape(node['kernel'])} "
      f"has d_in={layout.d_in}, d_out={layout.d_out}; block sizes that divide both: "
      f"{_divisors(layout.d_in, layout.d_out)}"
    )
  return Target(path, b, layout, layers)


def _check_pattern_keys(cfg: C3AConfig, selected: list[Target]) -> None:
  """A ValueError for a ``block_size_pattern`` key that matches none of the ``selected``."""
  used = {_pattern_key(t.path, cfg) for t in selected}
  for key in cfg.block_size_pattern:
    if key not in used and not any(re.match(rf".*\.{key}$", t.path) for t in selected):
      raise ValueError(
        f"block_size_pattern key {key!r} matches no C3A target; targets are "
        f"{[t.path for t in selected][:8]}"
      )


def _warn_unmatched(params: Mapping, cfg: C3AConfig) -> None:
  """An :class:`UnmatchedTargetWarning` for each list of ``target_modules`` or
  ``exclude_modules`` with entries that name no module of ``params`` (strings are regexes)."""
  paths = [p for p, _ in _tree.modules(params)]
  for field in ("target_modules", "exclude_modules"):
    names = getattr(cfg, field)
    if not isinstance(names, tuple):
      continue
    unmatched = tuple(n for n in names if not any(_ends_with(p, (n,)) for p in paths))
    if unmatched:
      warnings.warn(_unmatched_warning(field, unmatched, paths), stacklevel=4)


def _unmatched_warning(
  field: str, unmatched: tuple[str, ...], paths: list[str]
) -> UnmatchedTargetWarning:
  """The warning naming ``unmatched`` entries of ``field``, each with the nearest module name."""
  suffixes = {".".join(p.split(".")[i:]) for p in paths for i in range(p.count(".") + 1)}
  near = {e: difflib.get_close_matches(e, suffixes, n=1) for e in unmatched}
  hints = [
    f"{m[0]!r}" + (f" for {e!r}" if len(unmatched) > 1 else "") for e, m in near.items() if m
  ]
  hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
  listed = ", ".join(map(repr, unmatched))
  which = f"entry {listed} matches" if len(unmatched) == 1 else f"entries {listed} match"
  effect = "adapts" if field == "target_modules" else "excludes"
  return UnmatchedTargetWarning(
    f"{field} {which} no module of the params{hint}: a list entry names a module path or its "
    f"last dot-separated segments, so it {effect} nothing here",
    field,
    unmatched,
  )
