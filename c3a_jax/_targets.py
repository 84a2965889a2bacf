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
import math
import re
import warnings
from collections.abc import Mapping
from typing import Any

from c3a_jax import _tree
from c3a_jax._config import C3AConfig

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
C3A_LEAVES = ("c3a_kernel", "c3a_kernel_out_in")


@dataclasses.dataclass(frozen=True)
class Target:
  """One selected layer: its path, block size, sizes, and kernel layout."""

  path: str
  block_size: int
  d_in: int
  d_out: int
  out_in: bool = False  # kernel stored (d_out, d_in), as FlaxConv1D does

  @property
  def shape(self) -> tuple[int, int, int]:
    """The C3A kernel's shape ``(d_out // b, d_in // b, b)``."""
    b = self.block_size
    return (self.d_out // b, self.d_in // b, b)


def is_dense(node: Any) -> bool:
  """A Dense-like module: a 2-D ``kernel`` beside array leaves only."""
  return (
    isinstance(node, Mapping)
    and "kernel" in node
    and len(_tree.shape(node["kernel"])) == 2
    and not any(isinstance(v, Mapping) for v in node.values())
  )


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


def _matches(path: str, node: Mapping, cfg: C3AConfig, targets: Any) -> bool:
  """PEFT 0.21's check_target_module_exists, on a params-tree path."""
  if isinstance(cfg.exclude_modules, str):
    if re.fullmatch(cfg.exclude_modules, path):
      return False
  elif cfg.exclude_modules and _ends_with(path, cfg.exclude_modules):
    return False
  if in_modules_to_save(path, cfg):
    return False
  if targets == "all-linear":
    return is_dense(node) and not any(seg in HEAD_NAMES for seg in path.split("."))
  if isinstance(targets, str):
    return re.fullmatch(targets, path) is not None
  if path in targets:
    return True
  if not _ends_with(path, targets):
    return False
  layers = cfg.layers_to_transform
  if layers is None or layers == ():
    return True
  index = _layer_index(path, cfg.layers_pattern)
  if index is None:
    return False
  return index == layers if isinstance(layers, int) else index in layers


def named_target(path: str, cfg: C3AConfig) -> bool | None:
  """Whether ``cfg`` targets the layer at ``path`` by its name alone, as PEFT decides which
  saved tensors to load; None where that takes the model (``all-linear``, or the model type's
  default targets)."""
  if cfg.target_modules is None or cfg.target_modules == "all-linear":
    return None
  return _matches(path, {}, cfg, cfg.target_modules)


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


def select(params: Mapping, cfg: C3AConfig, *, model_type: str | None = None) -> list[Target]:
  """The layers ``cfg`` adapts in ``params``, in tree order.

  Args:
    params: a Flax params tree (the ``"params"`` collection).
    cfg: the C3A config.
    model_type: e.g. ``model.config.model_type`` for a Hugging Face model; gives PEFT's default
      targets when ``cfg.target_modules`` is None, and tells which layers store their kernel
      ``(out, in)`` (GPT-2's Conv1D).

  Raises:
    ValueError: naming the layer, its shape and the block size, when a target is not a Dense
      layer or a block size does not divide its sizes; when nothing matches; when a
      ``block_size_pattern`` key matches no target.
  """
  targets = cfg.target_modules
  if targets is None:
    if model_type not in DEFAULT_TARGETS:
      known = ", ".join(sorted(DEFAULT_TARGETS))
      raise ValueError(
        f"C3AConfig.target_modules is None and model_type={model_type!r} has no default "
        f"targets (known: {known}); pass target_modules, e.g. ['query', 'value']"
      )
    targets = DEFAULT_TARGETS[model_type]
  out_in_names = OUT_IN_LAYERS.get(model_type, ())
  selected = []
  root = [("", params)] if is_dense(params) else []  # a bare Dense's params
  for path, node in [*root, *_tree.modules(params)]:
    if not _matches(path, node, cfg, targets):
      continue
    if not is_dense(node):
      leaves = {
        k: (_tree.shape(v) if not isinstance(v, Mapping) else "{...}") for k, v in node.items()
      }
      raise ValueError(
        f"C3A target {path!r} (matched by target_modules={targets!r}) is not a Dense layer: it "
        f"holds {leaves}. C3A adapts Dense layers (a 2-D 'kernel'); narrow target_modules."
      )
    out_in = _ends_with(path, out_in_names)
    if model_type is None and _ends_with(path, OUT_IN_LAYERS["gpt2"]):
      warnings.warn(
        f"layer {path!r} is named like GPT-2's Conv1D, whose kernel is stored "
        "(out, in); if this is GPT-2, pass model_type='gpt2' or merge will be wrong",
        stacklevel=3,
      )
    rows, cols = _tree.shape(node["kernel"])
    d_in, d_out = (cols, rows) if out_in else (rows, cols)
    b = block_size_for(path, cfg)
    if d_in % b or d_out % b:
      raise ValueError(
        f"block size {b} does not divide layer {path!r}: kernel {(rows, cols)} has d_in={d_in}, "
        f"d_out={d_out}; block sizes that divide both: {_divisors(d_in, d_out)}"
      )
    selected.append(Target(path, b, d_in, d_out, out_in))
  if not selected:
    dense = [p for p, n in _tree.modules(params) if is_dense(n)]
    raise ValueError(
      f"target_modules={targets!r} matched no layer. Dense layers here include: {dense[:8]}"
      + (" ..." if len(dense) > 8 else "")
    )
  used = {_pattern_key(t.path, cfg) for t in selected}
  for key in cfg.block_size_pattern:
    if key not in used and not any(re.match(rf".*\.{key}$", t.path) for t in selected):
      raise ValueError(
        f"block_size_pattern key {key!r} matches no C3A target; targets are "
        f"{[t.path for t in selected][:8]}"
      )
  return selected
