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

The sections are pydantic models. Pydantic v2 has each check a config needs built in (unknown
keys refused, NaN and infinity refused, ranges, literals, strict ints that take no bool, errors
located by key) and is small, ubiquitous and well maintained. OmegaConf's structured configs
check types but no ranges or finiteness; tyro and draccus generate whole command lines, which
would replace the ``key=value`` overrides (YAML values) that run directories and docs use.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from typing import Annotated, Any, Literal, Union

import pydantic
import yaml
from pydantic import Field
from pydantic_core import PydanticCustomError, PydanticKnownError

from c3a_jax import C3AConfig, _compat, ops, quantize
from c3a_jax.io import brief


def _not_bool(value: Any) -> Any:
  # Lax floats parse 3e-1, which PyYAML reads as a string (its floats need a dot), but they
  # also take True as 1.0: no bool is a rate.
  if isinstance(value, bool):
    raise PydanticKnownError("float_type")
  return value


# The largest float32: rates and decays are float32 in training, where a larger value is
# infinite, and a finite config value must not turn into one past the non-finite check.
_FLOAT32_MAX = 3.4028234663852886e38


def _fits_float32(value: float) -> float:
  if abs(value) > _FLOAT32_MAX:
    raise PydanticCustomError(
      "float32_overflow",
      f"Input should be at most {_FLOAT32_MAX:.7g}: a larger value overflows float32, the "
      "training dtype",
    )
  return value


_INT_LIMIT = 2**32  # seeds and counts go to numpy and JAX as 32-bit values
Count = Annotated[int, Field(ge=1, lt=_INT_LIMIT)]
NonNegativeInt = Annotated[int, Field(ge=0, lt=_INT_LIMIT)]
NonNegativeFloat = Annotated[
  float,
  Field(ge=0, strict=False),
  pydantic.BeforeValidator(_not_bool),
  pydantic.AfterValidator(_fits_float32),
]


class _Section(pydantic.BaseModel):
  # Strict: an int field takes no bool, no 1.5 and no "3"; floats relax it (NonNegativeFloat).
  model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, strict=True)


class QuantizeSpec(_Section):
  """The frozen base quantized by Qwix's post-training quantization before C3A attaches
  (QC3A, as QLoRA): ``c3a_jax.quantize``'s settings."""

  weights: Literal[quantize.WEIGHTS] = Field(
    description="how the frozen weights are stored (the section must set it)"
  )
  tile_size: Count | None = Field(
    None, description="input features per scale (e.g. 32, 64, 128); null: one per output"
  )
  module_path: str | None = Field(
    None,
    description="a regex over Qwix's layer paths (layers/0/attn/q_proj); null: every linear "
    "layer (Tunix: *_proj, *_einsum) but c3a.modules_to_save's",
  )

  @pydantic.field_validator("module_path")
  @classmethod
  def _a_regex(cls, module_path: str | None) -> str | None:
    if module_path is not None:
      try:
        re.compile(module_path)
      except re.error as e:
        raise ValueError(
          f"model.quantize.module_path: {brief(module_path)} is not a regular expression ({e})"
        ) from None
    return module_path

  def rule_path(self, trained: tuple[str, ...] | None = (), library: str = "transformers") -> str:
    """The regex Qwix's rule matches layer paths with: ``module_path``, or by default the
    route's linear layers (:data:`QUANTIZED_LAYERS`) outside the modules ``trained`` names
    (c3a.modules_to_save: a quantized weight cannot train), matched as PEFT matches them: a
    module whose path ends with an entry, and what it holds (``head`` takes ``lm_head``)."""
    if self.module_path is not None:
      return self.module_path
    layers = QUANTIZED_LAYERS[library][0]
    names = "|".join(re.escape(name.replace(".", "/")) for name in trained or ())
    return f"(?!.*(?:{names})(?:/.*)?$){layers}" if names else layers

  def label(self) -> str:
    """The storage in short, as plots name it: ``int8 (tile 32)``, ``nf4 (per channel)``."""
    return f"{self.weights} ({f'tile {self.tile_size}' if self.tile_size else 'per channel'})"

  def describe(self, trained: tuple[str, ...] | None = (), library: str = "transformers") -> str:
    """How the base is stored, in words: ``int8 (tile 32), Qwix PTQ, every linear layer but
    classifier``."""
    if self.module_path is not None:
      layers = f"the layers matching {self.module_path!r}"
    else:
      layers = QUANTIZED_LAYERS[library][1] + (f" but {', '.join(trained)}" if trained else "")
    return f"{self.label()}, Qwix PTQ, {layers}"


# model.library -> (the layers model.quantize quantizes by default, in words). Tunix's: its
# projections, as c3a.quantize's docs advise (Gemma's tied embedding is no layer to quantize).
QUANTIZED_LAYERS = {
  "transformers": (".*", "every linear layer"),
  "tunix": (".*(?:_proj|_einsum)", "every *_proj and *_einsum layer"),
}


def _quantize_section(value: Any) -> Any:
  # model.quantize: int8 (or the override model.quantize=int8) is the section with its weights.
  if isinstance(value, str):
    return {"weights": value}
  if value is not None and not isinstance(value, (dict, QuantizeSpec)):
    raise ValueError(
      f"model.quantize: a section (weights, tile_size, module_path) or one of "
      f"{', '.join(quantize.WEIGHTS)}, got {brief(value)}"
    )
  return value


class ModelSpec(_Section):
  """The base model: a Hugging Face hub name or local directory, run by transformers' Flax
  models or (``library: tunix``, causal LMs) by Tunix's NNX Qwen 3 / Llama 3; ``quantize``
  stores its frozen weights in 8 or 4 bits (Qwix), for C3A to train over."""

  name: str | None = Field(None, description="a hub name or a local model directory")
  from_pt: bool = Field(
    False, description="load PyTorch weights (model.safetensors / pytorch_model.bin)"
  )
  revision: str | None = Field(None, description="the hub revision: a branch, tag or commit")
  library: Literal["transformers", "tunix"] = Field(
    "transformers", description="transformers' Flax models, or Tunix's NNX LLMs (causal_lm)"
  )
  quantize: Annotated[QuantizeSpec | None, pydantic.BeforeValidator(_quantize_section)] = Field(
    None,
    description="the frozen base quantized by Qwix (QC3A; int8 alone sets weights); null: none",
  )


class DataSpec(_Section):
  """A ``datasets`` name (with ``subset``), a ``save_to_disk`` directory, or a CSV/JSON file."""

  name: str | None = Field(
    None, description="a datasets name, a save_to_disk directory, or a CSV/JSON file"
  )
  subset: str | None = Field(None, description="the dataset's configuration, e.g. glue's sst2")
  train_split: str = Field("train", description="the split to train on")
  eval_split: str | None = Field(
    "validation", description="the split (with a data file: the file) to evaluate on; null: none"
  )
  text_column: str = Field("text", description="the text column")
  text_pair_column: str | None = Field(None, description="the second text of pair tasks")
  label_column: str = Field("label", description="the class id column")
  image_column: str = Field("image", description="the image column (image_cls)")
  prompt_template: str | None = Field(
    None, description='causal LM: e.g. "### Instruction:\\n{instruction}\\n..." over columns'
  )
  max_length: Count = Field(128, description="tokens per example (truncated or padded)")
  num_labels: NonNegativeInt | None = Field(
    None, description="classes (null or 0: read from the data)"
  )
  max_train_examples: Count | None = Field(None, description="train on at most this many")
  max_eval_examples: Count | None = Field(None, description="evaluate on at most this many")


class TrainSpec(_Section):
  """Optimisation: ``lr`` is C3A's (PEFT's 1/d_in scale wants ~1e-1), ``head_lr`` the head's."""

  mode: Literal["c3a", "head", "full"] = Field(
    "c3a", description="what trains: the C3A adapter, the head alone, or every weight"
  )
  steps: Count = Field(1000, description="optimizer steps")
  batch_size: Count = Field(32, description="examples per step")
  lr: NonNegativeFloat = Field(0.1, description="C3A's learning rate (PEFT's scale wants ~1e-1)")
  head_lr: NonNegativeFloat | None = Field(
    None, description="the learning rate of the head and of head/full modes (null: lr)"
  )
  weight_decay: NonNegativeFloat = Field(0.0, description="AdamW's weight decay")
  warmup_steps: NonNegativeInt = Field(0, description="steps of linear learning-rate warmup")
  grad_accum: Count = Field(1, description="micro-batches per step; must divide batch_size")
  compute_dtype: Literal["float32", "bfloat16"] = Field(
    "float32", description="the dtype the model computes in"
  )
  eval_every: Count = Field(200, description="steps between evaluations")
  save_every: Count = Field(200, description="steps between checkpoints")
  keep_checkpoints: Count = Field(3, description="checkpoints kept (the newest)")
  log_every: Count = Field(10, description="steps between log lines")
  seed: NonNegativeInt = Field(0, description="the seed of initialisation and data order")
  strategy: str = Field(
    "auto", description=f"how the C3A delta is computed: {' | '.join(ops.STRATEGIES)}"
  )

  @property
  def eval_batch_size(self) -> int:
    """Evaluation runs in micro-batches: no more memory than a training micro-step."""
    return self.batch_size // self.grad_accum

  @pydantic.field_validator("strategy")
  @classmethod
  def _known_strategy(cls, strategy: str) -> str:
    return ops.check_strategy(strategy, "train.strategy")  # a deprecated name warns, mapped

  @pydantic.model_validator(mode="after")
  def _micro_batches(self) -> TrainSpec:
    if self.batch_size % self.grad_accum:
      raise ValueError(
        f"train.grad_accum={self.grad_accum} must divide train.batch_size="
        f"{self.batch_size} (each step splits the batch into micro-batches)"
      )
    return self


_C3A_FIELDS = ", ".join(f.name for f in dataclasses.fields(C3AConfig))


def _c3a_config(value: Any) -> C3AConfig:
  """A ``c3a`` mapping as a C3AConfig, which validates itself."""
  if isinstance(value, C3AConfig):
    return value
  if not isinstance(value, dict):  # pydantic's own error would ask for a C3AConfig instance
    raise PydanticKnownError("dict_type")
  try:
    return C3AConfig(**value)
  except TypeError as e:  # an unknown key
    raise ValueError(f"c3a: {e} (c3a has: {_C3A_FIELDS})") from None
  except ValueError as e:
    raise ValueError(f"c3a: {e}") from None


DIGITS_DIR = "runs/c3a-digits"


def default_output_dir(task: Any, model: Any) -> str:
  """``runs/<task>-<the model name's last part>`` (``runs/causal_lm-Qwen3-0.6B``); the digits
  task's is ``runs/c3a-digits``. ``task`` and ``model`` as a config holds them, unvalidated."""
  name = model.get("name") if isinstance(model, dict) else getattr(model, "name", None)
  if task in (None, "digits") or not isinstance(task, str) or not isinstance(name, str):
    return DIGITS_DIR  # digits, or a config that validation refuses anyway
  return os.path.join("runs", f"{task}-{os.path.basename(os.path.normpath(name))}")


class Experiment(_Section):
  """Everything a run needs; ``c3a`` holds C3AConfig's fields (PEFT's names)."""

  task: Literal["digits", "seq_cls", "causal_lm", "image_cls"] = Field(
    "digits", description="the offline digits default, or a hub model's task"
  )
  model: ModelSpec = ModelSpec()
  data: DataSpec = DataSpec()
  # PEFT's defaults: the model type's targets, block 256.
  c3a: Annotated[C3AConfig, pydantic.BeforeValidator(_c3a_config)] = C3AConfig()
  train: TrainSpec = TrainSpec()
  output_dir: str = Field(
    DIGITS_DIR, description="the run directory (other tasks: runs/<task>-<model name's end>)"
  )

  @pydantic.model_validator(mode="before")
  @classmethod
  def _default_output_dir(cls, data: Any) -> Any:
    # One default directory per task and model: a causal LM run left without output_dir must
    # not find (and be told to --overwrite) the digits demo's.
    if isinstance(data, dict) and data.get("output_dir") is None:
      data = {**data, "output_dir": default_output_dir(data.get("task"), data.get("model"))}
    return data

  @pydantic.model_validator(mode="after")
  def _runnable(self) -> Experiment:
    if self.task == "digits":
      # The digits task runs its own MLP on scikit-learn's digits: a model or data section
      # would be ignored, so a user who set one meant another task.
      unused = [
        f"{s}.{k}"
        for s in ("model", "data")
        for k, v in getattr(self, s)
        if v != type(getattr(self, s)).model_fields[k].default
      ]
      if unused:
        raise ValueError(
          f"task 'digits' runs its built-in MLP on scikit-learn's digits and uses no "
          f"{', '.join(sorted(unused))}; drop them, or set task to seq_cls, causal_lm or image_cls"
        )
    if self.task != "digits" and not self.model.name:
      raise ValueError(f"task {self.task!r} needs model.name (a hub name or a path)")
    if self.model.library == "tunix" and self.task != "causal_lm":
      raise ValueError("model.library 'tunix' runs causal LMs; set task: causal_lm")
    if self.task != "digits" and not self.data.name:
      raise ValueError(f"task {self.task!r} needs data.name (a dataset or a file)")
    if self.model.quantize is not None:
      self._quantizable()
    return self

  def _quantizable(self) -> None:
    """What trains over a quantized base: the adapter (and the head, biases), never its weights."""
    weights = self.model.quantize.weights
    if self.train.mode == "full":
      raise ValueError(
        f"train.mode 'full' trains every weight, but model.quantize stores the frozen base in "
        f"{weights}, which does not train; use train.mode c3a (or head), or drop model.quantize"
      )
    if self.train.strategy == "fold":
      raise ValueError(
        f"train.strategy 'fold' adds the C3A delta into each kernel, which model.quantize "
        f"stores in {weights} (the delta would round away); use auto, fft, freq_major or dense"
      )

  @classmethod
  def from_dict(
    cls, d: dict, overrides: tuple[str, ...] | list[str] = (), source: str = "config"
  ) -> Experiment:
    """Builds and validates; ``overrides`` are ``dotted.key=value`` (value parsed as YAML)."""
    if not isinstance(d, dict):
      raise ValueError(
        f"{source}: the top level must be a mapping of sections, got {type(d).__name__}"
      )
    d = _compat.upgrade_experiment(_overridden(d, overrides), source)
    try:
      return cls.model_validate(d)
    except pydantic.ValidationError as e:
      raise ValueError(f"{source}: {_message(e)}") from None

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
    out = self.model_dump()
    out["c3a"] = {  # in place: config.yaml keeps the fields' order
      k: v
      for k, v in self.c3a.to_dict().items()
      if k not in ("peft_type", "auto_mapping", "revision", "inference_mode")
    }
    return out


def _overridden(d: dict, overrides: tuple[str, ...] | list[str]) -> dict:
  """``d`` with ``dotted.key=value`` overrides set (values parsed as YAML); ``d`` is unchanged."""
  d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"override {item!r} is not key=value (e.g. train.lr=0.3)")
    *parents, leaf = key.split(".")
    node = d
    for p in parents:
      child = node.setdefault(p, {})
      if not isinstance(child, dict):
        raise ValueError(f"override {item!r}: {p} is not a section")
      node[p] = node = dict(child)  # a copy: a section inside a section (model.quantize) too
    try:
      node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError as e:
      problem = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise ValueError(
        f"override {item!r}: {brief(value)} is not a YAML value ({problem}); quote strings, "
        "e.g. data.name='my data'"
      ) from None
  return d


def _message(error: pydantic.ValidationError) -> str:
  """Pydantic's first error as one bounded line: the dotted key, what is valid, the value.

  Not ``str(error)``: that spans lines, and it reprs each whole value first (a YAML alias bomb's
  takes hours).
  """
  errors = error.errors(include_url=False)
  first, more = errors[0], len(errors) - 1
  loc = tuple(map(str, first["loc"]))
  if first["type"] == "extra_forbidden":
    text = _unknown_key(loc)
  elif first["type"] == "value_error":  # this module's own checks name their keys
    text = str(first["ctx"]["error"])
  else:
    text = f"{'.'.join(loc)}: {first['msg']}, got {brief(first['input'])}"
  return text[:400] + (f" (and {more} more)" if more else "")


def _unknown_key(loc: tuple[str, ...]) -> str:
  *section, _ = loc
  model: Any = Experiment
  for name in section:
    model = _section(model.model_fields[name].annotation)
  where = ".".join(section) or "the top level"
  known = ", ".join(sorted(model.model_fields))
  return f"unknown key {'.'.join(loc)} ({where} has: {known})"


def _section(hint: Any) -> Any:
  """The section model a field's hint holds: ``QuantizeSpec`` for ``QuantizeSpec | None`` (or
  its ``Annotated`` form); other hints as they are."""
  if typing.get_origin(hint) is Annotated:
    return _section(typing.get_args(hint)[0])
  if typing.get_origin(hint) in (Union, types.UnionType):
    models = [_section(a) for a in typing.get_args(hint) if a is not type(None)]
    if len(models) == 1:
      return models[0]
  return hint


def fields_help(bare: dict | None = None) -> str:
  """Every config key with its type, default and meaning: ``c3a-jax train --help``'s epilog.

  ``bare``: the config a ``c3a-jax train`` without ``--config`` runs (the digits default);
  where it sets a key to another value than the default, the row says so.
  """
  rows = list(_schema())
  width = max(len(key) for key, *_ in rows)
  others = _flat(bare or {})
  note = lambda key, default: (
    f"  (no --config: {others[key]!r})" if key in others and others[key] != default else ""
  )
  return "\n".join(
    [
      "config keys (set in the YAML file or as key=value), with type = default and meaning;",
      "c3a's are PEFT's C3AConfig fields (help(c3a_jax.C3AConfig)). The defaults are a config",
      "file's; (no --config: X) is what a bare `c3a-jax train` (configs/digits.yaml) uses:",
      *(
        f"  {key:<{width}}  {hint} = {default!r}  {meaning}".rstrip() + note(key, default)
        for key, hint, default, meaning in rows
      ),
    ]
  )


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
  """``{"train": {"lr": 0.3}}`` as ``{"train.lr": 0.3}``."""
  out = {}
  for key, value in d.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _schema() -> typing.Iterator[tuple[str, str, Any, str]]:
  """(dotted key, type, default, meaning) of every config field, in a config's order."""
  for name, field in Experiment.model_fields.items():
    section = field.annotation
    if section is C3AConfig:  # a stdlib dataclass, documented in its docstring
      hints = typing.get_type_hints(C3AConfig)
      for f in dataclasses.fields(C3AConfig):
        yield f"{name}.{f.name}", _type_name(hints[f.name]), _default(f), ""
    elif isinstance(section, type) and issubclass(section, pydantic.BaseModel):
      yield from _section_schema(name, section)
    else:
      yield name, _type_name(section), field.default, field.description or ""


class _Required:
  def __repr__(self) -> str:
    return "(required)"


_REQUIRED = _Required()  # the default help shows for a field a section must set


def _section_schema(prefix: str, section: type[pydantic.BaseModel]) -> typing.Iterator[tuple]:
  """(dotted key, type, default, meaning) of a section's fields; an optional sub-section
  (``model.quantize``) as a row of its own, then its fields'."""
  for key, f in section.model_fields.items():
    default = _REQUIRED if f.is_required() else f.default
    yield f"{prefix}.{key}", _type_name(f.annotation), default, f.description or ""
    inner = _section(f.annotation)
    if isinstance(inner, type) and issubclass(inner, pydantic.BaseModel):
      yield from _section_schema(f"{prefix}.{key}", inner)


def _default(f: dataclasses.Field) -> Any:
  return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _type_name(hint: Any) -> str:
  """``int | None``, ``'c3a' | 'head'``: a type hint as a config file's reader thinks of it."""
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin is Annotated:
    return _type_name(args[0])
  if origin is Literal:
    return " | ".join(map(repr, args))
  if origin in (Union, types.UnionType):
    return " | ".join(map(_type_name, args))
  if hint is type(None):
    return "None"
  if isinstance(hint, type) and issubclass(hint, pydantic.BaseModel):
    return "section"
  return str(hint) if origin else hint.__name__
