"""A PEFT C3A adapter merged into a Hugging Face safetensors checkpoint, file to file.

What PEFT's ``merge_and_unload`` does on the PyTorch model, done on the files: each adapted
``Linear`` weight ``W`` (PyTorch ``(out, in)``) becomes ``W + delta``, the C3A delta in PyTorch
layout; ``modules_to_save`` weights and trained biases replace the base's. Every other file of
the checkpoint (config, tokenizer) is copied. Serving stacks that read Hugging Face checkpoints
(transformers, vLLM, SGLang, TGI) load the result as a plain model.

With :func:`c3a_jax.save_adapter`'s ``key_map``, this exports a model trained in JAX (a Tunix
NNX model, a scanned linen stack) to the Hugging Face layout without knowing its module names:
the adapter file already speaks PEFT's.

Example:
  >>> import os, tempfile, numpy as np, safetensors.numpy, c3a_jax as c3a
  >>> base, adapter, out = (tempfile.mkdtemp() for _ in range(3))
  >>> safetensors.numpy.save_file({"fc.weight": np.eye(8, dtype=np.float32)},
  ...                             os.path.join(base, "model.safetensors"))
  >>> _ = c3a.C3AConfig(block_size=4, target_modules=["fc"]).save(adapter)
  >>> safetensors.numpy.save_file(
  ...   {"base_model.model.fc.c3a_kernel": np.ones((2, 2, 4), np.float32)},
  ...   os.path.join(adapter, "adapter_model.safetensors"))
  >>> c3a.merge_checkpoint(base, adapter, out + "/merged")
  >>> w = safetensors.numpy.load_file(out + "/merged/model.safetensors")["fc.weight"]
  >>> bool(np.allclose(w, np.eye(8) + 1 / 8))
  True
"""

from __future__ import annotations

import os
import shutil

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.flax
import safetensors.numpy

from c3a_jax import ops
from c3a_jax._config import C3AConfig
from c3a_jax._peft_io import WEIGHTS_NAME, module_and_leaf
from c3a_jax._transform import note_rounding, warn_rounding
from c3a_jax.io import atomic_write, publish_directory, read_json

_INDEX = "model.safetensors.index.json"


def _shards(base_dir: str) -> list[str]:
  index = os.path.join(base_dir, _INDEX)
  if os.path.isfile(index):
    weight_map = read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
      raise ValueError(
        f"{index} has no 'weight_map' object of tensor name -> shard file, as transformers "
        "writes; is it a sharded checkpoint's index?"
      )
    return sorted(set(weight_map.values()))
  if os.path.isfile(os.path.join(base_dir, "model.safetensors")):
    return ["model.safetensors"]
  raise FileNotFoundError(
    f"merge_checkpoint: {base_dir} holds no model.safetensors (nor {_INDEX}); save the base "
    "model with safe_serialization=True"
  )


def _updates(adapter_dir: str) -> dict[str, tuple[str, np.ndarray]]:
  """Each base tensor the adapter changes -> (how: "add" a delta or "set", the tensor)."""
  C3AConfig.load(adapter_dir)  # a C3A adapter_config.json, or a clear error
  path = os.path.join(adapter_dir, WEIGHTS_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"merge_checkpoint: {path} does not exist")
  updates = {}
  for key, value in safetensors.numpy.load_file(path).items():
    module_leaf = module_and_leaf(key)
    if module_leaf is None:
      continue  # PEFT's frozen copy of a modules_to_save module
    module, name = module_leaf
    if name == "c3a_kernel":
      updates[f"{module}.weight"] = ("add", np.asarray(ops.delta_weight(value)).T)
    else:
      updates[f"{module}.{name}"] = ("set", value)
  return updates


def _check(base_dir: str, shards: list[str], updates: dict, adapter_dir: str) -> None:
  """Every tensor the adapter changes is in the checkpoint, of its shape; checked before
  anything is written."""
  found = {}
  for shard in shards:
    with safetensors.safe_open(os.path.join(base_dir, shard), framework="flax") as f:
      names = f.keys()  # safe_open has keys() but is not iterable
      found.update({k: (shard, tuple(f.get_slice(k).get_shape())) for k in names})
  missing = sorted(set(updates) - set(found))
  if missing:
    raise ValueError(
      f"merge_checkpoint: {adapter_dir} changes {missing[:8]}, which {base_dir} does not hold; "
      "is the adapter for this model (and its key_map right)?"
    )
  for key, (_, value) in updates.items():
    shard, shape = found[key]
    if shape != value.shape:
      raise ValueError(
        f"merge_checkpoint: {adapter_dir} changes {key} by a tensor of shape {value.shape}, "
        f"but {shard} holds it as {shape}"
      )


def merge_checkpoint(
  base_dir: str, adapter_dir: str, out_dir: str, *, overwrite: bool = False
) -> None:
  """Writes ``base_dir``'s checkpoint with the adapter in ``adapter_dir`` merged into ``out_dir``.

  Args:
    base_dir: a Hugging Face model directory with ``model.safetensors`` (or sharded ones).
    adapter_dir: a PEFT C3A adapter (:func:`c3a_jax.save_adapter`'s or PEFT's).
    out_dir: where the merged checkpoint goes; made whole (built beside it, then renamed) when
      it does not exist.
    overwrite: write into a non-empty ``out_dir`` (files of the same names are replaced,
      nothing else is deleted).

  Merged weights keep the base's dtype; a bfloat16 layer that would lose more than 1% of its
  delta to rounding is named in a warning.

  Raises:
    ValueError: ``out_dir`` is ``base_dir`` or non-empty without ``overwrite``; an adapter
      tensor names a weight the checkpoint lacks, or of another shape.
    FileNotFoundError: a file is missing.
  """
  if os.path.realpath(out_dir) == os.path.realpath(base_dir):
    raise ValueError(
      f"merge_checkpoint: {out_dir} is the base checkpoint; merging into it would replace the "
      "base. Choose another out_dir"
    )
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise ValueError(f"merge_checkpoint: {out_dir} is not empty; pass overwrite=True")
  shards = _shards(base_dir)
  updates = _updates(adapter_dir)
  _check(base_dir, shards, updates, adapter_dir)
  lossy: list = []
  with publish_directory(out_dir) as target:
    for shard in shards:
      atomic_write(os.path.join(target, shard), _merged_shard(base_dir, shard, updates, lossy))
    _copy_others(base_dir, shards, target)
  warn_rounding(lossy, "merge_checkpoint", "keep the checkpoint in float32 to keep the deltas")


def _merged_shard(base_dir: str, shard: str, updates: dict, lossy: list) -> bytes:
  """Checkpoint file ``shard`` with the adapter's ``updates`` applied, in the base's dtypes;
  each bfloat16 delta that rounding loses is noted in ``lossy``."""
  tensors = safetensors.flax.load_file(os.path.join(base_dir, shard))
  for key in sorted(set(tensors) & set(updates)):
    how, value = updates[key]
    base = tensors[key]
    if how == "add":
      merged = (base.astype(jnp.float32) + value).astype(base.dtype)
      note_rounding(lossy, key, base, merged, value)
    else:
      merged = jnp.asarray(value, base.dtype)
    tensors[key] = merged
  return safetensors.flax.save(tensors, metadata={"format": "pt"})


def _copy_others(base_dir: str, shards: list[str], target: str) -> None:
  """Every other file of the checkpoint (config, tokenizer) copied into ``target``, but
  PyTorch weight files."""
  for name in os.listdir(base_dir):
    source = os.path.join(base_dir, name)
    if name not in shards and os.path.isfile(source) and not name.endswith((".bin", ".pt")):
      shutil.copy2(source, os.path.join(target, name))
