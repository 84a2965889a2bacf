"""Experiment configs for the CLI: a YAML file plus ``key=value`` overrides, validated.

Example:
  >>> from c3a_jax.cli.experiment import Experiment
  >>> exp = Experiment.from_dict({"task": "seq_cls", "model": {"name": "roberta-base"},
  ...                             "data": {"name": "glue", "subset": "sst2"}},
  ...                            overrides=["train.lr=0.3", "c3a.block_size=128"])
  >>> exp.train.lr, exp.c3a.block_size
  (0.3, 128)
  >>> Experiment.from_dict({"train": {"lr_c3a": 1}})
  Traceback (most recent call last):
  ...
  ValueError: config: unknown key train.lr_c3a (train has: batch_size, compute_dtype, ...)
"""

from __future__ import annotations

import dataclasses
import math
import os
import reprlib
import types
import typing
import warnings
from typing import Any, Literal, Union

import yaml

from c3a_jax import C3AConfig, ops


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The base model: a Hugging Face hub name or local directory, run by transformers' Flax
  models or (``library: tunix``, causal LMs) by Tunix's NNX Qwen 3 / Llama 3."""

  name: str | None = None
  from_pt: bool = False  # load PyTorch weights (model.safetensors / pytorch_model.bin)
  revision: str | None = None
  library: Literal["transformers", "tunix"] = "transformers"


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """A ``datasets`` name (with ``subset``), a ``save_to_disk`` directory, or a CSV/JSON file."""

  name: str | None = None
  subset: str | None = None
  train_split: str = "train"
  eval_split: str | None = "validation"
  text_column: str = "text"
  text_pair_column: str | None = None
  label_column: str = "label"
  image_column: str = "image"
  prompt_template: str | None = None  # causal LM: e.g. "### Instruction:\n{instruction}\n..."
  max_length: int = 128
  num_labels: int | None = None
  max_train_examples: int | None = None
  max_eval_examples: int | None = None

  def __post_init__(self):
    for key in ("max_train_examples", "max_eval_examples", "max_length"):
      if getattr(self, key) is not None and getattr(self, key) < 1:
        raise ValueError(f"data.{key} must be at least 1, got {getattr(self, key)!r}")


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """Optimisation: ``lr`` is C3A's (PEFT's 1/d_in scale wants ~1e-1), ``head_lr`` the head's."""

  mode: Literal["c3a", "head", "full"] = "c3a"
  steps: int = 1000
  batch_size: int = 32
  lr: float = 1e-1
  head_lr: float | None = None
  weight_decay: float = 0.0
  warmup_steps: int = 0
  grad_accum: int = 1
  compute_dtype: Literal["float32", "bfloat16"] = "float32"
  eval_every: int = 200
  save_every: int = 200
  keep_checkpoints: int = 3
  log_every: int = 10
  seed: int = 0
  strategy: str = "auto"  # how the C3A delta is computed (c3a_jax.ops.STRATEGIES): same values

  @property
  def eval_batch_size(self) -> int:
    """Evaluation runs in micro-batches: no more memory than a training micro-step."""
    return self.batch_size // self.grad_accum

  def __post_init__(self):
    for key in (
      "steps",
      "batch_size",
      "grad_accum",
      "eval_every",
      "save_every",
      "keep_checkpoints",
      "log_every",
    ):
      if getattr(self, key) < 1:
        raise ValueError(f"train.{key} must be at least 1, got {getattr(self, key)!r}")
    object.__setattr__(self, "strategy", ops.check_strategy(self.strategy, "train.strategy"))
    if self.batch_size % self.grad_accum:
      raise ValueError(
        f"train.grad_accum={self.grad_accum} must divide train.batch_size="
        f"{self.batch_size} (each step splits the batch into micro-batches)"
      )


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a run needs; ``c3a`` holds C3AConfig's fields (PEFT's names)."""

  task: Literal["digits", "seq_cls", "causal_lm", "image_cls"] = "digits"
  model: ModelSpec = ModelSpec()
  data: DataSpec = DataSpec()
  # PEFT's defaults: the model type's targets, block 256 (frozen, so one instance is safe).
  c3a: C3AConfig = C3AConfig()  # noqa: RUF009
  train: TrainSpec = TrainSpec()
  output_dir: str = "runs/c3a-digits"

  @classmethod
  def from_dict(
    cls, d: dict, overrides: tuple[str, ...] | list[str] = (), source: str = "config"
  ) -> Experiment:
    """Builds and validates; ``overrides`` are ``dotted.key=value`` (value parsed as YAML)."""
    if not isinstance(d, dict):
      raise ValueError(
        f"{source}: the top level must be a mapping of sections, got {type(d).__name__}"
      )
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for item in overrides:
      key, sep, value = item.partition("=")
      if not sep or not key:
        raise ValueError(f"override {item!r} is not key=value (e.g. train.lr=0.3)")
      *parents, leaf = key.split(".")
      node = d
      for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
          raise ValueError(f"override {item!r}: {p} is not a section")
      try:
        node[leaf] = yaml.safe_load(value)
      except yaml.YAMLError as e:
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
          f"override {item!r}: {_brief(value)} is not a YAML value ({problem}); quote strings, "
          "e.g. data.name='my data'"
        ) from None
    exp = _build(cls, upgrade(d, source), source, "")
    if exp.task != "digits" and not exp.model.name:
      raise ValueError(f"{source}: task {exp.task!r} needs model.name (a hub name or a path)")
    if exp.model.library == "tunix" and exp.task != "causal_lm":
      raise ValueError(f"{source}: model.library 'tunix' runs causal LMs; set task: causal_lm")
    if exp.task != "digits" and not exp.data.name:
      raise ValueError(f"{source}: task {exp.task!r} needs data.name (a dataset or a file)")
    return exp

  @classmethod
  def load(cls, path: str, overrides: tuple[str, ...] | list[str] = ()) -> Experiment:
    """Reads a YAML (or JSON) config file."""
    if not os.path.isfile(path):
      raise FileNotFoundError(f"config file {path} does not exist")
    try:
      with open(path) as f:
        d = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
      raise ValueError(f"config file {path} is not valid YAML: {e}") from None
    return cls.from_dict(d, overrides, source=path)

  def to_dict(self) -> dict:
    """The config as plain data, as ``config.yaml`` holds it (C3A's PEFT bookkeeping left out)."""
    out = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, C3AConfig):
        value = {
          k: v
          for k, v in value.to_dict().items()
          if k not in ("peft_type", "auto_mapping", "revision", "inference_mode")
        }
      elif dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
      out[f.name] = value
    return out


# c3a-jax 0.1's strategies that 0.2 renamed or removed, and what computes the same now.
_OLD_STRATEGIES = {"merged": "fold", "rfft": "fft", "dft": "freq_major", "pallas": "auto"}


def upgrade(d: dict, source: str) -> dict:
  """A config read from YAML, with what c3a-jax 0.1 wrote moved to where 0.2 reads it.

  0.1 kept the strategy in the adapter config (``c3a.strategy``); it is a training setting
  now: ``train.strategy`` (unless that is set), old names mapped to what computes the same.
  A FutureWarning says so. ``d`` itself is not changed.
  """
  section = d.get("c3a") if isinstance(d, dict) else None
  if not isinstance(section, dict) or "strategy" not in section:
    return d
  old = section["strategy"]
  new = _OLD_STRATEGIES.get(old, old)
  warnings.warn(
    f"{source}: c3a.strategy is deprecated; it is read as train.strategy={new!r}"
    + ("" if new == old else f" (c3a-jax 0.2 has no strategy {old!r})"),
    FutureWarning,
    stacklevel=3,
  )
  train = d.get("train")
  train = dict(train) if isinstance(train, dict) else {} if train is None else train
  if isinstance(train, dict):
    train.setdefault("strategy", new)
  c3a = {k: v for k, v in section.items() if k != "strategy"}
  return {**d, "c3a": c3a, "train": train}


def _build(cls: type, d: Any, source: str, prefix: str) -> Any:
  if not isinstance(d, dict):
    raise ValueError(f"{source}: {prefix[:-1]} must be a mapping, got {_brief(d)}")
  if cls is C3AConfig:
    try:
      return C3AConfig(**d)
    except TypeError as e:
      known = ", ".join(f.name for f in dataclasses.fields(C3AConfig))
      raise ValueError(f"{source}: {prefix[:-1]}: {e} (c3a has: {known})") from None
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None
  hints = typing.get_type_hints(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  for key in d:
    if key not in names:
      where = prefix[:-1] or "the top level"
      raise ValueError(
        f"{source}: unknown key {prefix}{key} ({where} has: {', '.join(sorted(names))})"
      )
  kwargs = {}
  for key, value in d.items():
    hint = hints[key]
    if dataclasses.is_dataclass(hint) or hint is C3AConfig:
      kwargs[key] = _build(hint, value, source, f"{prefix}{key}.")
    else:
      kwargs[key] = _check(value, hint, f"{prefix}{key}", source)
  try:
    return cls(**kwargs)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from None


_MAX_INT = 2**32
# Error messages show values through this: a YAML alias bomb expands to billions of strings.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 60, 60


def _brief(value: Any) -> str:
  text = _REPR.repr(value)
  return text if len(text) <= 120 else text[:117] + "..."


def _check(value: Any, hint: Any, key: str, source: str) -> Any:
  """Validates ``value`` against a simple type hint, with an error naming the key."""
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (Union, types.UnionType):  # Optional[X] and X | None
    if value is None and type(None) in args:
      return None
    hint = next(a for a in args if a is not type(None))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin is Literal:
    if value not in args:
      raise ValueError(f"{source}: {key} must be one of {args}, got {_brief(value)}")
    return value
  if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
    try:
      value = float(value)  # YAML reads 3e-1 (no dot) as a string
    except ValueError:
      raise ValueError(f"{source}: {key} must be a number, got {_brief(value)}") from None
  if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
    raise ValueError(f"{source}: {key} must be an integer, got {_brief(value)}")
  if not isinstance(value, hint):
    raise ValueError(f"{source}: {key} must be a {hint.__name__}, got {_brief(value)}")
  if hint is float and not math.isfinite(value):  # NaN would pass every comparison below
    raise ValueError(f"{source}: {key} must be a finite number, got {_brief(value)}")
  if hint in (int, float) and value < 0:
    raise ValueError(f"{source}: {key} must not be negative, got {_brief(value)}")
  if hint is int and value >= _MAX_INT:  # seeds go to numpy and JAX as 32-bit values
    raise ValueError(f"{source}: {key} must be below 2**32, got {_brief(value)}")
  return value
