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
      lambda t: t.update({KERNEL: np.full(t[KERNEL].shape, 1e300)}),
      r"query.c3a_kernel' holds 32 values that overflow float32 \(largest magnitude 1e\+300\)",
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
  ids=[
    "lora",
    "integer",
    "nan",
    "overflows-float32",
    "untargeted-kernel",
    "untrained-weight",
    "untrained-bias",
  ],
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


def test_load_refuses_a_file_missing_a_targeted_layer(saved):
  """PEFT gives a targeted layer the file leaves out a fresh init: the two libraries would compute
  different models from one file. With the model given, load_adapter names the layer; without
  it, the targets are unknown and the file loads as it is."""
  path, params = saved
  _rewrite(path, lambda t: t.pop(P + "encoder.layer.1.ffn.c3a_kernel"))
  with pytest.raises(
    ValueError,
    match=r"adapter_model.safetensors holds no c3a_kernel for layer 'encoder.layer.1.ffn', "
    r"which its target_modules \('query', 'ffn'\) select",
  ):
    c3a.load_adapter(path, params)
  adapter, _ = c3a.load_adapter(path)
  assert "c3a_kernel" not in adapter["encoder"]["layer"]["1"]["ffn"]


def _stacked(n_layers=3):
  """A scanned stack (kernels (L, 8, 8)) with C3A kernels, as attach(forward=...) gives it."""
  layer = lambda: {"kernel": jnp.ones((n_layers, 8, 8)), "bias": jnp.zeros((n_layers, 8))}
  base = {"layers": {"q": layer(), "v": layer()}}
  adapted = jax.tree.map(lambda x: x, base)
  for name in ("q", "v"):
    adapted["layers"][name]["c3a_kernel"] = jnp.ones((n_layers, 2, 2, 4))
  return base, adapted


def test_load_refuses_a_file_missing_a_layer_of_a_stack_or_a_part_of_a_split(tmp_path):
  base, adapted = _stacked()
  cfg = c3a.C3AConfig(block_size=4, target_modules=["q", "v"])
  c3a.save_adapter(str(tmp_path / "a"), adapted, cfg)
  c3a.load_adapter(str(tmp_path / "a"), base)  # whole: loads
  _rewrite(str(tmp_path / "a"), lambda t: t.pop(P + "layers.1.q.c3a_kernel"))
  with pytest.raises(ValueError, match=r"no c3a_kernel for layer 'layers.1.q' \(layer 1 of"):
    c3a.load_adapter(str(tmp_path / "a"), base)
  c3a.save_adapter(str(tmp_path / "b"), adapted, cfg)
  _rewrite(str(tmp_path / "b"), lambda t: [t.pop(P + f"layers.{i}.v.c3a_kernel") for i in range(3)])
  with pytest.raises(ValueError, match=r"no c3a_kernel for layer 'layers.0.v'"):
    c3a.load_adapter(str(tmp_path / "b"), base)
  # A key_map that splits a fused layer: each part is a layer PEFT adapts.
  fused = {"attn": {"kv": {"kernel": jnp.ones((8, 16))}}}
  key_map = [(r"^attn\.kv$", ("attn.k", "attn.v"))]
  kv = c3a.C3AConfig(block_size=4, target_modules=["kv"])
  c3a.save_adapter(
    str(tmp_path / "c"), c3a.attach(fused, kv, jax.random.key(0)), kv, key_map=key_map
  )
  _rewrite(str(tmp_path / "c"), lambda t: t.pop(P + "attn.v.c3a_kernel"))
  with pytest.raises(ValueError, match=r"no c3a_kernel for layer 'attn.v' \(part 2 of 2 of"):
    c3a.load_adapter(str(tmp_path / "c"), fused, key_map=key_map)


def test_load_refuses_a_file_missing_a_targeted_layer_of_an_nnx_model(tmp_path):
  from flax import nnx

  class Two(nnx.Module):
    def __init__(self):
      self.fc0 = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
      self.fc1 = nnx.Linear(8, 8, rngs=nnx.Rngs(1))

  cfg = c3a.C3AConfig(block_size=4, target_modules=["fc0", "fc1"])
  c3a.save_adapter(str(tmp_path), c3a.attach(Two(), cfg, jax.random.key(0)), cfg)
  _rewrite(str(tmp_path), lambda t: t.pop(P + "fc1.c3a_kernel"))
  with pytest.raises(ValueError, match=r"no c3a_kernel for layer 'fc1'"):
    c3a.load_adapter(str(tmp_path), Two())


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_save_refuses_non_finite_tensors_and_writes_nothing(tmp_path, bad):
  params = c3a.attach(model_params(), CFG, jax.random.key(0))
  layer = params["encoder"]["layer"]["1"]["ffn"]
  layer["c3a_kernel"] = layer["c3a_kernel"].at[0, 0, 0].set(bad)
  with pytest.raises(
    ValueError, match=r"save_adapter: encoder.layer.1.ffn.c3a_kernel holds 1 non-finite value"
  ):
    c3a.save_adapter(str(tmp_path / "new"), params, CFG)
  assert not os.listdir(tmp_path)
  head = c3a.attach(model_params(), CFG, jax.random.key(0))
  head["classifier"]["norm"]["scale"] = head["classifier"]["norm"]["scale"].at[3].set(bad)
  with pytest.raises(ValueError, match=r"classifier.norm.scale holds 1 non-finite value"):
    c3a.save_adapter(str(tmp_path), head, CFG)
  assert not os.listdir(tmp_path)


def test_save_refuses_float64_values_that_overflow_float32(tmp_path):
  params = c3a.attach(model_params(), CFG, jax.random.key(0))
  params["classifier"]["dense"]["bias"] = np.full(16, 1e300)  # float64, as under x64
  with pytest.raises(ValueError, match=r"classifier.dense.bias holds 16 values that overflow"):
    c3a.save_adapter(str(tmp_path), params, CFG)
  assert not os.listdir(tmp_path)


def test_a_non_utf8_or_deeply_nested_adapter_file_is_one_error_naming_it(saved):
  path, params = saved
  weights = os.path.join(path, "adapter_model.safetensors")
  header = b'{"\xff\xfe": 1}'
  with open(weights, "wb") as f:
    f.write(len(header).to_bytes(8, "little") + header)
  with pytest.raises(ValueError, match=r"adapter_model.safetensors is not a readable safetensors"):
    c3a.load_adapter(path, params)
  config = os.path.join(path, "adapter_config.json")
  with open(config, "wb") as f:
    f.write(b'{"peft_type": "C3A", "base_model_name_or_path": "caf\xe9"}')
  with pytest.raises(ValueError, match=r"adapter_config.json is not UTF-8 text"):
    c3a.load_adapter(path, params)
  with open(config, "w") as f:
    f.write("[" * 100_000 + "]" * 100_000)
  with pytest.raises(ValueError, match=r"adapter_config.json nests deeper than"):
    c3a.load_adapter(path, params)
