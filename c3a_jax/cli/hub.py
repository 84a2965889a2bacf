"""Hugging Face Flax models and ``datasets`` data for the CLI: sequence classification, causal
LM and image classification.

Models load with ``from_pretrained`` from a hub name or a local directory (``from_pt=True`` for
PyTorch weights). Data comes from a hub dataset (``name`` + ``subset``), a ``save_to_disk``
directory, or a CSV/JSON(L) file (then ``eval_split`` may name a second file).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import re
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

import c3a_jax as c3a
from c3a_jax.cli.experiment import DataSpec, Experiment
from c3a_jax.cli.job import Job, Log, describe_quantized, quantize_errors, quantize_rule

FILE_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json"}
_AUTO = {
  "seq_cls": "FlaxAutoModelForSequenceClassification",
  "causal_lm": "FlaxAutoModelForCausalLM",
  "image_cls": "FlaxAutoModelForImageClassification",
}


class DataError(ValueError):
  """A data problem this module diagnosed itself (its message needs no wrapping)."""


# A hub repo id: "name" or "owner/name" (letters, digits, "_", "-", "."; no leading "." or "-").
_REPO_ID = re.compile(r"\w[\w.-]*(/\w[\w.-]*)?")


def _offline_hint(name: str) -> str:
  if os.path.exists(name):
    return f"tried the local path {name}"
  unreachable = _hub_unreachable()
  if unreachable:
    return f"the Hugging Face hub at {unreachable}, and the local cache lacks it"
  from huggingface_hub import constants

  if constants.HF_HUB_OFFLINE:
    return "offline mode (HF_HUB_OFFLINE=1) is set, and the local cache lacks it"
  return (
    f"tried the Hugging Face hub for {name!r} (no such local path); this machine may be offline"
  )


def check_local(name: str, key: str, what: str) -> None:
  """A FileNotFoundError naming ``name`` (``key``'s value) if it can only be a local path and
  does not exist: it is no hub repo id, or its first part is a local directory (``data/x``
  beside a ``data/``). Asking the hub for it would only fail, slowly where it is offline."""
  if os.path.exists(name):
    return
  if not _REPO_ID.fullmatch(name):
    raise FileNotFoundError(
      f"{key} {name!r} does not exist, and is not a hub {what} name ('name' or 'owner/name')"
    )
  first = name.split("/")[0]
  if "/" in name and os.path.isdir(first):
    raise FileNotFoundError(
      f"{key} {name!r} does not exist ({first}/ is a local directory, so it names no hub {what})"
    )


@functools.cache
def _hub_unreachable() -> str | None:
  """Why the hub cannot be reached ("ENDPOINT is unreachable (WHY)"); None where it can be,
  or where offline mode is set (then nothing asks it)."""
  import urllib.error
  import urllib.request

  from huggingface_hub import constants

  if constants.HF_HUB_OFFLINE:
    return None
  try:  # urllib honours the *_proxy variables, as huggingface_hub does
    request = urllib.request.Request(constants.ENDPOINT, method="HEAD")
    urllib.request.urlopen(request, timeout=5).close()
  except urllib.error.HTTPError:
    return None  # it answered
  except (OSError, ValueError) as e:  # URLError, timeouts, refused connections
    return f"{constants.ENDPOINT} is unreachable ({type(getattr(e, 'reason', e)).__name__})"
  return None


def offline_if_unreachable() -> None:
  """Sets Hugging Face's offline mode (``HF_HUB_OFFLINE=1``) where the hub cannot be reached.

  Unreachable, huggingface_hub retries each request for about 25 s, printing a warning per
  retry, before the error; offline, models and datasets come from the local cache at once
  (or fail at once, with the reason in the error).
  """
  if _hub_unreachable() is None:
    return
  import huggingface_hub.constants
  import huggingface_hub.utils

  huggingface_hub.constants.HF_HUB_OFFLINE = True
  huggingface_hub.utils.reset_sessions()  # new sessions refuse every request at once
  os.environ["HF_HUB_OFFLINE"] = "1"  # for modules that read it when imported
  try:
    import datasets.config
  except ImportError:
    return
  datasets.config.HF_HUB_OFFLINE = True  # datasets keeps its own copy


def load_model(exp: Experiment, **kwargs: Any) -> Any:
  """The task's Flax auto-model, from a hub name or a directory."""
  import transformers

  cls = getattr(transformers, _AUTO[exp.task])
  spec = exp.model
  check_local(spec.name, "model.name", "model")
  if not os.path.exists(spec.name):
    offline_if_unreachable()
  try:
    return cls.from_pretrained(spec.name, from_pt=spec.from_pt, revision=spec.revision, **kwargs)
  except (OSError, ValueError) as e:
    raise ValueError(
      f"could not load model {spec.name!r} ({_offline_hint(spec.name)}): {str(e).splitlines()[0]}"
    ) from None


def load_split(spec: DataSpec, split: str | None) -> Any:
  """One split as a ``datasets.Dataset``, or None when ``split`` is None."""
  if split is None:
    return None
  import datasets

  name, ext = spec.name, os.path.splitext(spec.name)[1].lower()
  try:
    if ext in FILE_FORMATS:
      path = spec.name if split == spec.train_split else split
      if not os.path.isfile(path):
        if path == spec.name:
          raise FileNotFoundError(f"data file {path} does not exist")
        raise FileNotFoundError(
          f"data.eval_split {split!r} is not a file: with a data file as "
          "data.name, set data.eval_split to an eval file, or to null"
        )
      with open(path) as f:
        empty = not f.read(4096).strip()
      if empty:
        raise DataError(
          f"data file {path} is empty"
          + ("" if path == spec.name else "; set data.eval_split to null to train without one")
        )
      return datasets.load_dataset(FILE_FORMATS[ext], data_files=path, split="train")
    if os.path.isdir(name) and (
      os.path.isfile(os.path.join(name, "dataset_dict.json"))
      or os.path.isfile(os.path.join(name, "dataset_info.json"))
    ):
      data = datasets.load_from_disk(name)
      if isinstance(data, datasets.DatasetDict):
        if split not in data:
          raise DataError(f"dataset {name} has no split {split!r} (splits: {list(data)})")
        return data[split]
      return data
    check_local(name, "data.name", "dataset")
    if not os.path.exists(name):
      offline_if_unreachable()
    return datasets.load_dataset(name, spec.subset, split=split)
  except (FileNotFoundError, DataError):
    raise  # already says what is wrong
  except Exception as e:  # datasets raises many kinds (ConnectionError, DatasetNotFoundError)
    raise ValueError(
      f"could not load dataset {name!r} split {split!r} "
      f"({_offline_hint(name)}): {type(e).__name__}: "
      f"{str(e).splitlines()[0] if str(e) else ''}"
    ) from None


def _columns(ds, split: str, spec: DataSpec, *names: str | None) -> None:
  for col in filter(None, names):
    if col not in ds.column_names:
      raise ValueError(
        f"dataset {spec.name!r} split {split!r} has no column {col!r} (columns: {ds.column_names})"
      )


def _limit(ds, n: int | None):
  return ds if ds is None or n is None else ds.select(range(min(n, len(ds))))


def _text(spec: DataSpec, ds, split: str, tokenizer, lm: bool) -> dict[str, np.ndarray]:
  if lm and spec.prompt_template:
    try:
      texts = [spec.prompt_template.format(**row) for row in ds]
    except KeyError as e:
      raise ValueError(
        f"data.prompt_template names column {e.args[0]!r}, which dataset "
        f"{spec.name!r} split {split!r} lacks (columns: {ds.column_names})"
      ) from None
    pairs = None
  else:
    _columns(ds, split, spec, spec.text_column, spec.text_pair_column)
    texts = list(ds[spec.text_column])
    pairs = list(ds[spec.text_pair_column]) if spec.text_pair_column else None
  enc = tokenizer(
    texts,
    pairs,
    padding="max_length",
    truncation=True,
    max_length=spec.max_length,
    return_tensors="np",
  )
  out = {
    "input_ids": enc["input_ids"].astype(np.int32),
    "attention_mask": enc["attention_mask"].astype(np.int32),
  }
  if lm:
    out["loss_mask"] = out["attention_mask"]
  else:
    out["labels"] = _labels(spec, ds, split)
  return out


def _images(spec: DataSpec, ds, split: str, processor) -> dict[str, np.ndarray]:
  _columns(ds, split, spec, spec.image_column, spec.label_column)
  images = [img.convert("RGB") for img in list(ds[spec.image_column])]
  pixels = processor(images, return_tensors="np")["pixel_values"].astype(np.float32)
  return {"pixel_values": pixels, "labels": _labels(spec, ds, split)}


def _labels(spec: DataSpec, ds, split: str) -> np.ndarray:
  _columns(ds, split, spec, spec.label_column)
  values = list(ds[spec.label_column])
  if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
    bad = next(v for v in values if not isinstance(v, (int, np.integer)) or isinstance(v, bool))
    raise ValueError(
      f"data.label_column {spec.label_column!r} of dataset {spec.name!r} split "
      f"{split!r} holds non-integer values (e.g. {bad!r}); labels must be class "
      "ids 0..num_labels-1"
    )
  return np.asarray(values, np.int32)


def _num_labels(spec: DataSpec, ds) -> int:
  if spec.num_labels:
    return spec.num_labels
  feature = ds.features.get(spec.label_column)
  if getattr(feature, "num_classes", None):
    return feature.num_classes
  return int(_labels(spec, ds, spec.train_split).max()) + 1


def _check_positions(max_length: int, config: Any) -> None:
  """Refuses sequences longer than the model's position table: inside jit, a position past its
  end is no error (JAX clamps the index), so every later token would share one embedding."""
  positions = getattr(config, "max_position_embeddings", None)
  if positions is None:
    return
  # RoBERTa-style models count positions from padding_idx + 1.
  usable = positions - (config.pad_token_id + 1 if "roberta" in config.model_type else 0)
  if max_length > usable:
    raise ValueError(
      f"data.max_length={max_length} is longer than the model's {usable} positions "
      f"(max_position_embeddings={positions}); set data.max_length to at most {usable}"
    )


def job(exp: Experiment, log: Log = print) -> Job:
  """Loads model, data and preprocessing for ``exp`` (a seq_cls, causal_lm or image_cls task)."""
  import transformers

  spec = exp.data
  train = _limit(load_split(spec, spec.train_split), spec.max_train_examples)
  evals = _limit(load_split(spec, spec.eval_split), spec.max_eval_examples)
  for ds, split in ((train, spec.train_split), (evals, spec.eval_split)):
    if ds is not None and len(ds) == 0:
      raise ValueError(
        f"dataset {spec.name!r} split {split!r} is empty"
        + ("; set data.eval_split to null to train without one" if split == spec.eval_split else "")
      )
  log(f"data: {len(train)} training examples" + (f", {len(evals)} eval" if evals else ""))
  # The model's dtype sets its activations' dtype; compute_dtype then casts the frozen weights.
  kwargs = {"dtype": jnp.bfloat16} if exp.train.compute_dtype == "bfloat16" else {}
  if exp.task in ("seq_cls", "image_cls"):
    _columns(train, spec.train_split, spec, spec.label_column)
    kwargs["num_labels"] = _num_labels(spec, train)
  model = load_model(exp, **kwargs)
  if exp.task != "image_cls":
    _check_positions(spec.max_length, model.config)
  if exp.task == "image_cls":
    processor = transformers.AutoImageProcessor.from_pretrained(exp.model.name)
    prep = lambda ds, split: _images(spec, ds, split, processor)
    tokens = 1
  else:
    processor = transformers.AutoTokenizer.from_pretrained(exp.model.name)
    if processor.pad_token is None:
      processor.pad_token = processor.eos_token
    lm = exp.task == "causal_lm"
    prep = lambda ds, split: _text(spec, ds, split, processor, lm)
    tokens = spec.max_length
  train_data = prep(train, spec.train_split)
  eval_data = prep(evals, spec.eval_split) if evals is not None else None
  inputs = "pixel_values" if exp.task == "image_cls" else "input_ids"

  def logits_fn(params, batch, rng, train):
    kw = {} if inputs == "pixel_values" else {"attention_mask": batch["attention_mask"]}
    return model(
      batch[inputs], params=params, dropout_rng=rng, train=bool(train and rng is not None), **kw
    ).logits

  def save_merged(params, out_dir):
    model.save_pretrained(out_dir, params=params)
    processor.save_pretrained(out_dir)

  params, quantized = model.params, None
  if exp.model.quantize is not None:
    one = {k: v[:1] for k, v in train_data.items()}  # an example input, for Qwix's init
    params, quantized = quantize(exp, model, lambda: logits_fn(model.params, one, None, False))
    log(f"base: {quantized}")

  return Job(
    logits_fn=logits_fn,
    params=params,
    train_data=train_data,
    eval_data=eval_data,
    kind="lm" if exp.task == "causal_lm" else "classify",
    model_type=model.config.model_type,
    tokens_per_example=tokens,
    save_merged=save_merged,
    quantized=quantized,
  )


class _Called(Exception):
  """Raised by :class:`_Recorder` once it has the arguments."""


@dataclasses.dataclass
class _Recorder:
  """Stands in for a transformers model's linen module: records what its ``apply`` is given."""

  args: tuple = ()
  kwargs: dict = dataclasses.field(default_factory=dict)

  def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
    self.args, self.kwargs = args, kwargs
    raise _Called


def module_inputs(model: Any, call: Callable[[], Any]) -> tuple:
  """The arguments with which ``call`` (a call of the transformers Flax ``model``) calls its
  linen module, in the module's positional order: what its ``init`` takes."""
  recorder, module = _Recorder(), model.module
  model._module = recorder  # transformers' model holds its module there (``model.module``)
  try:
    call()
  except _Called:
    pass
  finally:
    model._module = module
  signature = inspect.signature(type(module).__call__)
  kwargs = {k: v for k, v in recorder.kwargs.items() if k in signature.parameters}
  return signature.bind(module, *recorder.args, **kwargs).args[1:]


def quantize(exp: Experiment, model: Any, call: Callable[[], Any]) -> tuple[Any, str]:
  """(``model``'s params with the weights ``model.quantize`` names quantized by Qwix, how, in
  words); ``model`` holds them and computes Qwix's products from then on (its module is
  Qwix's). ``call`` calls ``model`` once (its inputs are recorded, never computed)."""
  spec = exp.model.quantize
  with quantize_errors(spec):
    qmodule, params = c3a.quantize.quantize_linen(
      model.module,
      model.params,
      *module_inputs(model, call),
      weights=spec.weights,
      tile_size=spec.tile_size,
      module_path=quantize_rule(exp),
    )
  model._module = qmodule
  model.params = params  # the float weights are let go: the quantized base is what runs
  return params, describe_quantized(exp, params)
