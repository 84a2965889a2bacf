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

import os
import shutil
import tempfile
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from c3a_jax import _tree
from c3a_jax._config import C3AConfig
from c3a_jax._io import atomic_write, current_umask
from c3a_jax._targets import C3A_LEAVES, block_size_for, named_target, trains_fully
from c3a_jax._transform import combine, split
from c3a_jax._tree import Params

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


def save_adapter(directory: str, params: Mapping, cfg: C3AConfig) -> None:
  """Writes the trainable part of ``params`` as a PEFT C3A adapter into ``directory``.

  ``params`` is the full tree or the adapter from :func:`c3a_jax.split`. Each file is written
  atomically. ``target_modules`` of None or ``"all-linear"`` is saved as the list of adapted
  layers, so PEFT adapts exactly those.

  Raises:
    ValueError: if ``params`` holds no C3A kernel, a kernel disagrees with ``cfg``'s block size,
      a layer stores its kernel ``(out, in)`` (GPT-2's Conv1D): PEFT's C3A supports
      ``torch.nn.Linear`` only and would misread it, or a layer both holds a C3A kernel and
      trains fully as ``modules_to_save`` (DistilBERT's ``pre_classifier`` under
      ``all-linear`` and ``SEQ_CLS``), which PEFT cannot load.
  """
  adapter, _ = split(params, cfg)
  tensors: dict[str, np.ndarray] = {}
  adapted, out_in, both = [], [], []
  for path, name, value in _tree.leaves(adapter):
    value = np.asarray(value)
    if name == C3A_KERNEL_OUT_IN:
      out_in.append(path)
      continue
    if name == C3A_KERNEL:
      adapted.append(path)
      if cfg.modules_to_save and trains_fully(path, cfg):
        both.append(path)
      b = block_size_for(path, cfg)
      if value.ndim != 3 or value.shape[2] != b:
        raise ValueError(
          f"save_adapter: {path}.c3a_kernel has shape {value.shape} but the config "
          f"gives layer {path!r} block size {b}; PEFT could not load it"
        )
    elif name == "bias" and any(n in _tree.get(adapter, path) for n in C3A_LEAVES):
      name = "base_layer.bias"  # PEFT wraps an adapted Linear; its own bias sits in base_layer.
    else:
      name, value = _to_torch(name, value)
    if value.dtype == jnp.bfloat16:  # numpy safetensors has no bfloat16; PEFT casts on load.
      value = value.astype(np.float32)
    tensors[f"{PREFIX}{path}.{name}"] = np.ascontiguousarray(value)
  if out_in:
    raise ValueError(
      f"save_adapter: layers {out_in} store their kernel (out, in) (transformers' Conv1D, as in "
      "GPT-2). PEFT's C3A supports torch.nn.Linear only and would misread them, so no PEFT "
      "adapter was written; keep such adapters with c3a.split and orbax or np.savez."
    )
  if not adapted:
    raise ValueError("save_adapter: params hold no c3a_kernel; call c3a.attach first")
  if both:
    raise ValueError(
      f"save_adapter: layers {both} hold a C3A kernel and also train fully as modules_to_save "
      f"{list(cfg.modules_to_save)} (PEFT takes every module whose name ends with an entry: "
      "'classifier' takes 'pre_classifier' too). PEFT cannot load such an adapter; attach "
      f"again with exclude_modules={both!r} (or name them out of target_modules)"
    )
  if cfg.target_modules is None or cfg.target_modules == "all-linear" or cfg.exclude_modules:
    # PEFT would resolve these its own way (and 0.21 has no exclude_modules): name the layers.
    cfg = cfg.replace(target_modules=tuple(adapted), exclude_modules=None)
  if "" in adapted:
    raise ValueError(
      "save_adapter: the C3A layer sits at the params root, so it has no module "
      "name for PEFT; nest the params under the layer's name"
    )
  if os.path.exists(directory):
    # Each file is replaced atomically; the config goes last, as it is what readers open first.
    atomic_write(os.path.join(directory, WEIGHTS_NAME), safetensors.numpy.save(tensors))
    cfg.save(directory)
    return
  # A new directory appears whole: built beside its final place, then renamed.
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.")
  try:
    atomic_write(os.path.join(tmp, WEIGHTS_NAME), safetensors.numpy.save(tensors))
    cfg.save(tmp)
    os.chmod(tmp, 0o777 & ~current_umask())
    os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


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
  if not np.isfinite(value).all():
    raise ValueError(f"{where} holds {int((~np.isfinite(value)).sum())} non-finite values")
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


def load_adapter(directory: str, params: Mapping | None = None) -> tuple[Params, C3AConfig]:
  """Reads a PEFT C3A adapter (saved by PEFT or :func:`save_adapter`) as ``(adapter, cfg)``.

  Pass the model's ``params`` to check every key and shape against the model (and to place
  ``modules_to_save`` weights exactly); then ``c3a.combine(adapter, params)`` runs it. PEFT's
  extra keys are understood: ``<layer>.base_layer.bias`` (the bias of an adapted layer) and,
  with ``bias="all"``, the copies under ``modules_to_save.`` and ``original_module.``.

  Tensors PEFT would read differently are refused, naming the key and the reason: integer or
  non-finite values, a C3A kernel of a layer the file's own ``target_modules`` leave out, a
  weight outside ``modules_to_save``, a bias ``bias`` does not train, or a tensor no C3A
  adapter has (``lora_A``). PEFT would drop the latter silently, computing another model.

  Raises:
    FileNotFoundError: a file is missing.
    ValueError: the directory is not a C3A adapter, a tensor is refused (above), or its keys or
      shapes do not fit ``params``.
  """
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
  adapter: Params = {}
  for key, value in tensors.items():
    where = f"{weights}: key {key!r}"
    if not key.startswith(PREFIX) or key.count(".") < 3:
      raise ValueError(f"{where} is not a PEFT adapter key ({PREFIX}<module path>.<name>)")
    path, name = key[len(PREFIX) :].rsplit(".", 1)
    parts = path.split(".")
    if "original_module" in parts:
      continue  # PEFT's frozen copy of a modules_to_save module (saved under bias="all")
    path = ".".join(p for p in parts if p not in ("base_layer", "modules_to_save"))
    module = None
    if params is not None:
      try:
        module = _tree.get(params, path)
      except KeyError as e:
        raise ValueError(
          f"{where} names module {path!r}, which the model does not have (no {e.args[0]!r})"
        ) from None
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
    _tree.set_leaf(adapter, path, name, jnp.asarray(value))
  if not any(name in C3A_LEAVES for _, name, _ in _tree.leaves(adapter)):
    raise ValueError(f"load_adapter: {weights} holds no c3a_kernel tensors; not a C3A adapter")
  if params is not None:
    try:
      combine(adapter, params)
    except ValueError as e:
      raise ValueError(f"load_adapter({directory}): {e}") from None
  return adapter, cfg
