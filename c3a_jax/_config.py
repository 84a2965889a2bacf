"""C3AConfig: PEFT's C3A configuration, validated, read from and written to adapter_config.json.

Example:
  >>> import c3a_jax as c3a
  >>> cfg = c3a.C3AConfig(block_size=64, target_modules=["query", "value"])
  >>> cfg.to_dict()["peft_type"]
  'C3A'
  >>> c3a.C3AConfig(block_size=0)
  Traceback (most recent call last):
  ...
  ValueError: C3AConfig.block_size must be a positive integer, got 0
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import re
import warnings
from typing import Any

from c3a_jax import _compat, ops
from c3a_jax.io import atomic_write, brief, read_json

CONFIG_NAME = "adapter_config.json"
BIAS = ("none", "all", "c3a_only")


# PEFT bookkeeping that is read and written but means nothing to c3a-jax.
_PEFT_EXTRAS = {"peft_type": "C3A", "auto_mapping": None, "revision": None, "inference_mode": True}
_PEFT_IGNORED = {"peft_version", "target_parameters"}
# PEFT's task models make their heads trainable (and save them) whatever modules_to_save says.
TASK_TYPES = (
  "SEQ_CLS",
  "SEQ_2_SEQ_LM",
  "CAUSAL_LM",
  "TOKEN_CLS",
  "QUESTION_ANS",
  "FEATURE_EXTRACTION",
)
TASK_HEADS = {
  "SEQ_CLS": ("classifier", "score"),
  "TOKEN_CLS": ("classifier", "score"),
  "QUESTION_ANS": ("qa_outputs",),
}


def _strs(value: Any, field: str, *, allow_str: bool) -> str | tuple[str, ...] | None:
  if value is None or (allow_str and isinstance(value, str)):
    return value
  if isinstance(value, str):
    value = [value]
  if not isinstance(value, (list, tuple, set, frozenset)) or not all(
    isinstance(v, str) for v in value
  ):
    kinds = "a list of module names, a regex string" if allow_str else "a list of module names"
    raise ValueError(f"C3AConfig.{field} must be {kinds} or None, got {brief(value)}")
  # Sorted for sets (PEFT stores target_modules as a set); dict.fromkeys dedups, keeping order.
  return tuple(dict.fromkeys(sorted(value) if isinstance(value, (set, frozenset)) else value))


def _positive_int(value: Any, field: str) -> int:
  # numbers.Integral takes numpy's integers too (np.int64(16) from a computed size).
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
    raise ValueError(f"C3AConfig.{field} must be a positive integer, got {brief(value)}")
  return int(value)


def _block_size_pattern(pattern: Any) -> dict[str, int]:
  if not isinstance(pattern, dict):
    raise ValueError(
      "C3AConfig.block_size_pattern must be a dict {name or regex: block_size}, "
      f"got {brief(pattern)}"
    )
  for key in pattern:
    _check_regex(key, "block_size_pattern key")
  return {key: _positive_int(size, f"block_size_pattern[{key!r}]") for key, size in pattern.items()}


def _with_task_heads(modules_to_save: Any, task_type: Any) -> tuple[str, ...] | None:
  """``modules_to_save`` with the heads PEFT's task model for ``task_type`` trains, if any."""
  if task_type is not None and task_type not in TASK_TYPES:
    raise ValueError(
      f"C3AConfig.task_type must be one of {TASK_TYPES} or None, got {brief(task_type)}"
    )
  if task_type not in TASK_HEADS:
    return modules_to_save
  return tuple(dict.fromkeys((*(modules_to_save or ()), *TASK_HEADS[task_type])))


def _layers_to_transform(layers: Any) -> int | tuple[int, ...] | None:
  if layers is None:
    return None
  if isinstance(layers, (list, tuple)):
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
      raise ValueError(
        "C3AConfig.layers_to_transform must be a non-negative int or a list "
        f"of them, got {brief(layers)}"
      )
    return tuple(layers)
  if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
    raise ValueError(
      "C3AConfig.layers_to_transform must be a non-negative int or a list of "
      f"them, got {brief(layers)}"
    )
  return layers


def _check_choices(bias: Any, init_weights: Any) -> None:
  if bias not in BIAS:
    raise ValueError(f"C3AConfig.bias must be one of {BIAS}, got {brief(bias)}")
  if not any(
    init_weights is v if isinstance(v, bool) else init_weights == v for v in ops.INIT_WEIGHTS
  ):
    raise ValueError(
      f"C3AConfig.init_weights must be one of {ops.INIT_WEIGHTS}, got {brief(init_weights)}"
    )


@dataclasses.dataclass(frozen=True)
class C3AConfig:
  """Which Dense layers get a C3A kernel, how big its blocks are, and what else trains.

  The fields, defaults and meanings are PEFT's ``C3AConfig`` (0.21):

  Attributes:
    block_size: block size ``b``; must divide the input and output size of every target.
    block_size_pattern: ``{key: block_size}``; the first key (in order) with
      ``re.match(rf".*\\.{key}$", path)`` sets a layer's block size.
    target_modules: a list of module names (a path equal to one, or ending in ``.`` + one),
      a regex matched against the whole path, ``"all-linear"``, or ``None`` for the model
      type's defaults.
    exclude_modules: a list of names or a regex; matching paths are never targets.
    layers_to_transform: layer index or indices to adapt (only with a list of targets).
    layers_pattern: the name before the layer index in paths, e.g. ``"layer"`` or ``"layers"``.
    bias: ``"none"``, ``"all"`` (every bias trains) or ``"c3a_only"`` (biases of C3A layers train).
    modules_to_save: subtrees (e.g. a classifier head) that train fully and are saved with the
      adapter.
    init_weights: ``"xavier_uniform"`` (default, also ``False``), ``"kaiming_uniform"``,
      ``"gaussian"``, or ``True`` for zeros (a no-op adapter).
    task_type: PEFT's task type (``"SEQ_CLS"``, ``"CAUSAL_LM"``, ...). As in PEFT, SEQ_CLS and
      TOKEN_CLS add ``"classifier"`` and ``"score"`` to ``modules_to_save``, QUESTION_ANS adds
      ``"qa_outputs"``.
    base_model_name_or_path: the base model, kept for PEFT.

  How the delta is computed is not part of the adapter: pass ``strategy`` to
  :func:`c3a_jax.intercept` (or ``train.strategy`` in a CLI config).
  """

  block_size: int = 256
  block_size_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
  target_modules: str | tuple[str, ...] | None = None
  exclude_modules: str | tuple[str, ...] | None = None
  layers_to_transform: int | tuple[int, ...] | None = None
  layers_pattern: str | tuple[str, ...] | None = None
  bias: str = "none"
  modules_to_save: tuple[str, ...] | None = None
  init_weights: ops.InitWeights = "xavier_uniform"
  task_type: str | None = None
  base_model_name_or_path: str | None = None

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)
    set_("block_size", _positive_int(self.block_size, "block_size"))
    set_("block_size_pattern", _block_size_pattern(self.block_size_pattern))
    set_("target_modules", _strs(self.target_modules, "target_modules", allow_str=True))
    set_("exclude_modules", _strs(self.exclude_modules, "exclude_modules", allow_str=True))
    set_("layers_pattern", _strs(self.layers_pattern, "layers_pattern", allow_str=True))
    set_("modules_to_save", _strs(self.modules_to_save, "modules_to_save", allow_str=False))
    set_("modules_to_save", _with_task_heads(self.modules_to_save, self.task_type))
    if isinstance(self.target_modules, str) and self.target_modules.lower() == "all-linear":
      set_("target_modules", "all-linear")  # PEFT accepts any case
    for field in ("target_modules", "exclude_modules", "layers_pattern", "modules_to_save"):
      value = getattr(self, field)
      for pattern in (value,) if isinstance(value, str) else value or ():
        if pattern != "all-linear":
          _check_regex(pattern, field)
    set_("layers_to_transform", _layers_to_transform(self.layers_to_transform))
    if isinstance(self.target_modules, str) and (
      self.layers_to_transform is not None or self.layers_pattern is not None
    ):
      raise ValueError(
        "C3AConfig.layers_to_transform and layers_pattern need target_modules as a "
        f"list of names, not the regex string {brief(self.target_modules)}"
      )
    _check_choices(self.bias, self.init_weights)

  def __hash__(self) -> int:
    # block_size_pattern is a dict; hash the serialised form so configs work as static args.
    return hash(json.dumps(self.to_dict(), sort_keys=True))

  def replace(self, **changes: Any) -> C3AConfig:
    """A copy with ``changes`` applied (and validated)."""
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """The adapter_config.json fields, as PEFT writes them."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    if d["exclude_modules"] is None:
      # PEFT 0.21's C3AConfig has no such field and warns about it; save_adapter never writes it.
      del d["exclude_modules"]
    return {**_PEFT_EXTRAS, **d}

  @classmethod
  def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> C3AConfig:
    """Builds a config from adapter_config.json fields; ``source`` names the origin in errors."""
    if d.get("peft_type", "C3A") != "C3A":
      raise ValueError(
        f"{source}: peft_type is {brief(d['peft_type'])}, not 'C3A'; this is not a C3A adapter"
      )
    names = {f.name for f in dataclasses.fields(cls)}
    d = _compat.upgrade_adapter_config(d, source)
    unknown = set(d) - names - set(_PEFT_EXTRAS) - _PEFT_IGNORED
    if unknown:
      warnings.warn(f"{source}: ignoring fields unknown to C3A: {sorted(unknown)}", stacklevel=2)
    try:
      return cls(**{k: v for k, v in d.items() if k in names})
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None

  def save(self, directory: str) -> str:
    """Writes ``directory/adapter_config.json`` atomically; returns its path."""
    path = os.path.join(directory, CONFIG_NAME)
    atomic_write(path, json.dumps(self.to_dict(), indent=2, sort_keys=True).encode())
    return path

  @classmethod
  def load(cls, directory: str) -> C3AConfig:
    """Reads ``directory/adapter_config.json`` (as written by PEFT or by :meth:`save`)."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f"{path} does not exist: a C3A adapter directory holds "
        f"{CONFIG_NAME} and adapter_model.safetensors"
      )
    d = read_json(path)  # one ValueError naming the file: not UTF-8, too deep, not JSON
    if not isinstance(d, dict):
      raise ValueError(f"{path} must hold a JSON object, got {type(d).__name__}")
    return cls.from_dict(d, source=path)


def _check_regex(pattern: str, field: str) -> None:
  try:
    re.compile(pattern)
  except re.error as e:
    raise ValueError(f"C3AConfig.{field} {brief(pattern)} is not a valid regex: {e}") from None
