"""merge_checkpoint: a PEFT adapter folded into Hugging Face safetensors files.

The reference is the definition: each adapted weight becomes ``W + delta`` with ``delta`` from
tests/reference.py in PyTorch ``(out, in)`` layout; other tensors and files are unchanged.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import c3a_jax as c3a
from tests.reference import dense_reference


@pytest.fixture
def checkpoint(tmp_path):
  """A two-shard checkpoint with a config, and an adapter for its q and v layers."""
  rng = np.random.default_rng(0)
  base = tmp_path / "base"
  base.mkdir()
  shards = {
    "model-00001-of-00002.safetensors": {
      "q.weight": rng.normal(size=(16, 8)),
      "q.bias": rng.normal(size=16),
    },
    "model-00002-of-00002.safetensors": {
      "v.weight": rng.normal(size=(8, 8)),
      "norm.weight": np.ones(8),
    },
  }
  weight_map = {}
  for name, tensors in shards.items():
    safetensors.numpy.save_file({k: v.astype(np.float32) for k, v in tensors.items()}, base / name)
    weight_map.update(dict.fromkeys(tensors, name))
  (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  (base / "config.json").write_text("{}")
  params = {
    "q": {"kernel": jnp.zeros((8, 16)), "bias": jnp.zeros(16)},
    "v": {"kernel": jnp.zeros((8, 8))},
  }
  cfg = c3a.C3AConfig(
    block_size=4, target_modules=["q", "v"], init_weights="gaussian", bias="c3a_only"
  )
  adapted = c3a.attach(params, cfg, jax.random.key(0))
  adapted["q"]["bias"] = jnp.full(16, 2.0)
  c3a.save_adapter(str(tmp_path / "adapter"), adapted, cfg)
  return base, tmp_path / "adapter", adapted, shards


def test_merge_checkpoint_adds_each_delta_in_pytorch_layout(checkpoint, tmp_path):
  base, adapter, adapted, shards = checkpoint
  c3a.merge_checkpoint(str(base), str(adapter), str(tmp_path / "out"))
  out = tmp_path / "out"
  assert sorted(os.listdir(out)) == sorted(os.listdir(base))
  first = safetensors.numpy.load_file(out / "model-00001-of-00002.safetensors")
  second = safetensors.numpy.load_file(out / "model-00002-of-00002.safetensors")
  base_q = shards["model-00001-of-00002.safetensors"]["q.weight"]
  base_v = shards["model-00002-of-00002.safetensors"]["v.weight"]
  for got, name, weight in ((first, "q", base_q), (second, "v", base_v)):
    want = weight + dense_reference(np.asarray(adapted[name]["c3a_kernel"]))
    np.testing.assert_allclose(got[f"{name}.weight"], want, atol=1e-5)
  np.testing.assert_array_equal(first["q.bias"], np.full(16, 2.0))  # a trained bias replaces
  np.testing.assert_array_equal(second["norm.weight"], np.ones(8))


def test_merge_checkpoint_refusals(checkpoint, tmp_path):
  base, adapter, _, _ = checkpoint
  with pytest.raises(ValueError, match="is the base checkpoint"):
    c3a.merge_checkpoint(str(base), str(adapter), str(base))
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "mine.txt").write_text("keep")
  with pytest.raises(ValueError, match="is not empty; pass overwrite=True"):
    c3a.merge_checkpoint(str(base), str(adapter), str(tmp_path / "full"))
  other = tmp_path / "other"
  other.mkdir()
  safetensors.numpy.save_file(
    {"k.weight": np.zeros((8, 8), np.float32)}, other / "model.safetensors"
  )
  with pytest.raises(
    ValueError, match=r"changes \['q.bias', 'q.weight', 'v.weight'\], which .* does not hold"
  ):
    c3a.merge_checkpoint(str(other), str(adapter), str(tmp_path / "out2"))
  assert not (tmp_path / "out2").exists()
  with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
    c3a.merge_checkpoint(str(tmp_path / "full"), str(adapter), str(tmp_path / "out3"))
