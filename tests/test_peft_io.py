"""save_adapter / load_adapter: PEFT's file format, and clear errors for bad adapters."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import c3a_jax as c3a


def model_params():
  rng = np.random.default_rng(0)
  dense = lambda i, o: {
    "kernel": jnp.asarray(rng.normal(size=(i, o)), jnp.float32),
    "bias": jnp.asarray(rng.normal(size=o), jnp.float32),
  }
  return {
    "encoder": {
      "layer": {
        str(i): {
          "query": dense(16, 16),
          "ffn": dense(16, 32),
          "norm": {"scale": jnp.ones(16), "bias": jnp.zeros(16)},
        }
        for i in range(2)
      }
    },
    "classifier": {"dense": dense(16, 16), "norm": {"scale": jnp.ones(16), "bias": jnp.zeros(16)}},
  }


CFG = c3a.C3AConfig(
  block_size=8,
  target_modules=["query", "ffn"],
  block_size_pattern={"ffn": 4},
  modules_to_save=["classifier"],
  bias="c3a_only",
  task_type="SEQ_CLS",
)


@pytest.fixture
def saved(tmp_path):
  params = c3a.attach(model_params(), CFG, jax.random.key(0))
  c3a.save_adapter(str(tmp_path), params, CFG)
  return str(tmp_path), params


def test_file_layout_is_peft(saved):
  path, params = saved
  assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"]
  cfg = json.load(open(os.path.join(path, "adapter_config.json")))
  assert cfg["peft_type"] == "C3A" and cfg["block_size_pattern"] == {"ffn": 4}
  tensors = safetensors.numpy.load_file(os.path.join(path, "adapter_model.safetensors"))
  p = "base_model.model."
  assert tensors[p + "encoder.layer.0.query.c3a_kernel"].shape == (2, 2, 8)
  assert tensors[p + "encoder.layer.1.ffn.c3a_kernel"].shape == (8, 4, 4)
  # PyTorch layout: Dense kernel (in, out) -> weight (out, in); LayerNorm scale -> weight.
  np.testing.assert_array_equal(
    tensors[p + "classifier.dense.weight"], np.asarray(params["classifier"]["dense"]["kernel"]).T
  )
  assert tensors[p + "classifier.norm.weight"].shape == (16,)
  # bias="c3a_only": an adapted layer's bias is PEFT's base_layer.bias.
  assert p + "encoder.layer.0.query.base_layer.bias" in tensors
  assert p + "encoder.layer.0.norm.bias" not in tensors
  assert not any("kernel" in k and "c3a" not in k for k in tensors)


@pytest.mark.parametrize("with_params", [True, False])
def test_round_trip(saved, with_params):
  path, params = saved
  adapter, cfg = c3a.load_adapter(path, params if with_params else None)
  assert cfg == CFG
  expected, _ = c3a.split(params, CFG)
  assert jax.tree.structure(adapter) == jax.tree.structure(expected)
  jax.tree.map(np.testing.assert_array_equal, adapter, expected)
  combined = c3a.combine(adapter, model_params())
  jax.tree.map(np.testing.assert_array_equal, combined, params)


def test_default_targets_are_saved_as_the_adapted_list(tmp_path):
  params = model_params()
  cfg = c3a.C3AConfig(block_size=8, target_modules="all-linear")
  c3a.save_adapter(str(tmp_path), c3a.attach(params, cfg, jax.random.key(0)), cfg)
  saved = json.load(open(tmp_path / "adapter_config.json"))["target_modules"]
  assert saved == [f"encoder.layer.{i}.{n}" for i in range(2) for n in ("query", "ffn")]


def test_save_refuses_conv1d_layers(tmp_path):
  params = {"h": {"0": {"c_fc": {"kernel": jnp.ones((32, 16)), "bias": jnp.zeros(32)}}}}
  cfg = c3a.C3AConfig(block_size=8, target_modules=["c_fc"])
  params = c3a.attach(params, cfg, jax.random.key(0), model_type="gpt2")
  with pytest.raises(
    ValueError,
    match=r"\['h.0.c_fc'\] store their kernel \(out, in\).*"
    "torch.nn.Linear only",
  ):
    c3a.save_adapter(str(tmp_path), params, cfg)
  assert not os.listdir(tmp_path)


def test_save_refuses_mismatch_and_empty(tmp_path):
  params = c3a.attach(model_params(), CFG, jax.random.key(0))
  with pytest.raises(
    ValueError,
    match=r"encoder.layer.0.ffn.c3a_kernel has shape \(8, 4, 4\) "
    r"but the config gives layer 'encoder.layer.0.ffn' block size 8",
  ):
    c3a.save_adapter(str(tmp_path), params, CFG.replace(block_size_pattern={}))
  with pytest.raises(ValueError, match="hold no c3a_kernel"):
    c3a.save_adapter(str(tmp_path), model_params(), CFG)
  assert not os.listdir(tmp_path)


def test_save_is_atomic_and_overwrites(saved):
  path, params = saved
  params["encoder"]["layer"]["0"]["query"]["c3a_kernel"] *= 2
  c3a.save_adapter(path, params, CFG)
  adapter, _ = c3a.load_adapter(path)
  np.testing.assert_array_equal(
    adapter["encoder"]["layer"]["0"]["query"]["c3a_kernel"],
    params["encoder"]["layer"]["0"]["query"]["c3a_kernel"],
  )
  assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"]


def _rewrite(path, edit):
  f = os.path.join(path, "adapter_model.safetensors")
  tensors = safetensors.numpy.load_file(f)
  edit(tensors)
  safetensors.numpy.save_file(tensors, f)


P = "base_model.model."


@pytest.mark.parametrize(
  "edit,match",
  [
    (
      lambda t: t.update({P + "decoder.layer.0.query.c3a_kernel": np.ones((2, 2, 8), np.float32)}),
      r"key 'base_model.model.decoder.layer.0.query.c3a_kernel' names module "
      r"'decoder.layer.0.query', which the model does not have",
    ),
    (
      lambda t: t.update({P + "encoder.layer.0.query.c3a_kernel": np.ones((2, 2, 4), np.float32)}),
      r"has shape \(2, 2, 4\); adapter_config.json gives block size 8",
    ),
    (
      lambda t: t.update({P + "encoder.layer.0.query.c3a_kernel": np.ones((1, 2, 8), np.float32)}),
      r"encoder.layer.0.query.c3a_kernel has shape \(1, 2, 8\).*kernel \(16, 16\)",
    ),
    (
      lambda t: t.update({P + "classifier.dense.weight": np.ones((8, 16), np.float32)}),
      r"classifier.dense.kernel has shape \(16, 8\), the base's has \(16, 16\)",
    ),
    (
      lambda t: t.update({"encoder.query.lora_A": np.ones((2, 2), np.float32)}),
      "is not a PEFT adapter key",
    ),
    (
      lambda t: t.update({P + "classifier.weight": np.ones((2, 2), np.float32)}),
      "has no kernel, scale or embedding",
    ),
  ],
)
def test_load_rejects_what_does_not_fit(saved, edit, match):
  path, params = saved
  _rewrite(path, edit)
  with pytest.raises(ValueError, match=match):
    c3a.load_adapter(path, params)


KERNEL = P + "encoder.layer.0.query.c3a_kernel"


@pytest.mark.parametrize(
  "edit,match",
  [
    (
      lambda t: t.update({P + "encoder.layer.0.query.lora_A": np.ones((2, 16), np.float32)}),
      r"'lora_A' is no tensor of a C3A adapter",
    ),
    (lambda t: t.update({KERNEL: t[KERNEL].astype(np.int32)}), r"has dtype int32"),
    (
      lambda t: t.update({KERNEL: np.where(np.arange(8) == 3, np.nan, t[KERNEL])}),
      r"query.c3a_kernel' holds 4 non-finite values",
    ),
    (
      lambda t: t.update({P + "encoder.layer.0.norm.c3a_kernel": np.ones((2, 2, 8), np.float32)}),
      r"layer 'encoder.layer.0.norm' is not in the file's own target_modules",
    ),
    (
      lambda t: t.update({P + "encoder.layer.0.norm.weight": np.ones(16, np.float32)}),
      r"module 'encoder.layer.0.norm' is not in modules_to_save",
    ),
    (
      lambda t: t.update({P + "encoder.layer.0.norm.bias": np.ones(16, np.float32)}),
      r"with bias='c3a_only', PEFT would skip this bias of 'encoder.layer.0.norm'",
    ),
  ],
  ids=["lora", "integer", "nan", "untargeted-kernel", "untrained-weight", "untrained-bias"],
)
def test_load_refuses_what_peft_would_read_differently(saved, edit, match):
  """PEFT drops tensors its config does not ask for, silently: loading them here would make
  the two frameworks compute different models. Each is refused, naming the key and why."""
  path, params = saved
  _rewrite(path, edit)
  for model in (params, None):  # with and without the model's params to check against
    with pytest.raises(ValueError, match=match):
      c3a.load_adapter(path, model)


def test_load_rejects_missing_and_foreign_files(tmp_path, saved):
  path, _ = saved
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    c3a.load_adapter(str(tmp_path / "nope"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="adapter_config.json does not exist"):
    c3a.load_adapter(str(empty))
  os.rename(
    os.path.join(path, "adapter_model.safetensors"), os.path.join(path, "adapter_model.bin")
  )
  with pytest.raises(FileNotFoundError, match="only adapter_model.bin is there"):
    c3a.load_adapter(path)
  with open(os.path.join(path, "adapter_model.safetensors"), "wb") as f:
    f.write(b"garbage")
  with pytest.raises(ValueError, match="not a readable safetensors file"):
    c3a.load_adapter(path)
  safetensors.numpy.save_file(
    {P + "classifier.dense.bias": np.ones(16, np.float32)},
    os.path.join(path, "adapter_model.safetensors"),
  )
  with pytest.raises(ValueError, match="holds no c3a_kernel tensors; not a C3A adapter"):
    c3a.load_adapter(path)
  cfg = json.load(open(os.path.join(path, "adapter_config.json")))
  json.dump({**cfg, "peft_type": "LORA"}, open(os.path.join(path, "adapter_config.json"), "w"))
  with pytest.raises(ValueError, match="peft_type is 'LORA', not 'C3A'"):
    c3a.load_adapter(path)


def test_files_are_world_readable_and_a_new_directory_appears_whole(tmp_path):
  params = c3a.attach(model_params(), CFG, jax.random.key(0))
  target = tmp_path / "new" / "adapter"
  c3a.save_adapter(str(target), params, CFG)
  old = os.umask(0)
  os.umask(old)
  for name in os.listdir(target):
    assert os.stat(target / name).st_mode & 0o777 == 0o666 & ~old
  assert os.listdir(tmp_path / "new") == ["adapter"]  # no temporary left behind


def test_save_refuses_a_root_level_layer(tmp_path):
  params = {"kernel": jnp.ones((8, 8))}
  cfg = c3a.C3AConfig(block_size=4, target_modules="all-linear")
  with pytest.raises(ValueError, match="sits at the params root"):
    c3a.save_adapter(str(tmp_path / "a"), c3a.attach(params, cfg, jax.random.key(0)), cfg)


def test_save_refuses_a_layer_both_adapted_and_trained_fully(tmp_path):
  """DistilBERT under all-linear + SEQ_CLS: "classifier" (PEFT's endswith rule) also takes
  pre_classifier, which all-linear adapts. PEFT cannot load that; save_adapter says what to do."""
  dense = lambda i, o: {"kernel": jnp.ones((i, o)), "bias": jnp.zeros(o)}
  params = {
    "distilbert": {"ffn": dense(16, 16)},
    "pre_classifier": dense(16, 16),
    "classifier": dense(16, 2),
  }
  cfg = c3a.C3AConfig(block_size=8, target_modules="all-linear", task_type="SEQ_CLS")
  adapted = c3a.attach(params, cfg, jax.random.key(0))
  assert "c3a_kernel" in adapted["pre_classifier"]
  with pytest.raises(
    ValueError,
    match=r"\['pre_classifier'\] hold a C3A kernel and also train "
    r"fully.*exclude_modules=\['pre_classifier'\]",
  ):
    c3a.save_adapter(str(tmp_path / "a"), adapted, cfg)
  assert not (tmp_path / "a").exists()
  fixed = cfg.replace(exclude_modules=["pre_classifier"])
  c3a.save_adapter(str(tmp_path / "b"), c3a.attach(params, fixed, jax.random.key(0)), fixed)
  adapter, _ = c3a.load_adapter(str(tmp_path / "b"), params)
  assert "c3a_kernel" not in adapter["pre_classifier"] and "kernel" in adapter["pre_classifier"]
