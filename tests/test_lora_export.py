"""C3A as LoRA: c3a.to_lora, save_adapter(as_lora=r) and c3a-jax export-lora.

The references are independent of the export's block-circulant SVD: the dense delta (the
tests' reference circulant, built with loops; ops.delta_weight once) and numpy's dense SVD of
it, which gives the best rank-r error (Eckart-Young); live, PEFT's own LoRA on the PyTorch model.
"""

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import yaml
from flax import nnx

import c3a_jax as c3a
from c3a_jax import cli, ops
from tests import tiny
from tests.reference import dense_reference
from tests.test_peft_io import CFG as PEFT_IO_CFG
from tests.test_peft_io import model_params

P = "base_model.model."


def _kernel(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _dense(w):
  return dense_reference(w).T  # Flax's (d_in, d_out)


def _best_error(delta, rank):
  """numpy's dense SVD: the smallest relative error of a rank-``rank`` matrix."""
  s = np.linalg.svd(delta, compute_uv=False)
  return float(np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s**2)))


def _error(delta, a, b):
  approx = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
  return float(np.linalg.norm(delta - approx) / np.linalg.norm(delta))


@pytest.mark.parametrize("shape", [(3, 2, 4), (2, 3, 5), (4, 4, 1), (1, 1, 6), (2, 5, 8)])
def test_full_rank_is_the_dense_delta_and_truncation_the_best_rank_r(shape):
  w = _kernel(shape)
  delta = _dense(w)
  full = min(delta.shape)
  errors = []
  for rank in range(1, full + 1):
    lora = c3a.to_lora({"layer": {"c3a_kernel": w}}, rank)
    f = lora.factors["layer"]
    assert f["lora_a"].shape == (delta.shape[0], rank) and f["lora_a"].dtype == jnp.float32
    assert f["lora_b"].shape == (rank, delta.shape[1])
    measured = _error(delta, f["lora_a"], f["lora_b"])
    reported = lora.errors["layer"]
    assert reported == pytest.approx(measured, abs=1e-6)
    assert reported == pytest.approx(_best_error(delta, rank), abs=1e-9)
    errors.append(reported)
  assert errors[-1] == 0.0 and _error(delta, f["lora_a"], f["lora_b"]) < 1e-6
  assert np.all(np.diff(errors) < 0)  # each rank more loses less


def test_factors_are_balanced_and_padded_past_a_layers_full_rank():
  adapter = {"small": {"c3a_kernel": _kernel((1, 2, 4))}, "big": {"c3a_kernel": _kernel((3, 3, 4))}}
  lora = c3a.to_lora(adapter, 6)  # small: (8, 4), full rank 4; big: (12, 12)
  small = lora.factors["small"]
  assert small["lora_a"].shape == (8, 6) and small["lora_b"].shape == (6, 4)
  assert not np.asarray(small["lora_a"])[:, 4:].any() and not np.asarray(small["lora_b"])[4:].any()
  np.testing.assert_allclose(
    small["lora_a"] @ small["lora_b"], _dense(adapter["small"]["c3a_kernel"]), atol=1e-6
  )
  assert lora.errors["small"] == 0.0 and lora.errors["big"] > 0
  # Singular values split as square roots: both factors carry the same column norms.
  big = lora.factors["big"]
  np.testing.assert_allclose(
    np.linalg.norm(big["lora_a"], axis=0), np.linalg.norm(big["lora_b"], axis=1), rtol=1e-5
  )


def test_a_stack_gives_stacked_factors_and_names_each_layer():
  w = _kernel((3, 2, 2, 4))
  cfg = c3a.C3AConfig(block_size=4, target_modules=["q"], layers_pattern="layers")
  lora = c3a.to_lora({"model": {"layers": {"q": {"c3a_kernel": w}}}}, 3, cfg)
  f = lora.factors["model"]["layers"]["q"]
  assert f["lora_a"].shape == (3, 8, 3) and f["lora_b"].shape == (3, 3, 8)
  assert list(lora.errors) == [f"model.layers.{i}.q" for i in range(3)]
  for i in range(3):
    assert lora.errors[f"model.layers.{i}.q"] == pytest.approx(_best_error(_dense(w[i]), 3))
    one = c3a.to_lora({"q": {"c3a_kernel": w[i]}}, 3)
    np.testing.assert_array_equal(f["lora_a"][i], one.factors["q"]["lora_a"])
  # Without a config the index follows the first segment, as save_adapter names it.
  assert list(c3a.to_lora({"layers": {"q": {"c3a_kernel": w}}}, 1).errors)[1] == "layers.1.q"


def test_params_and_nnx_models_give_the_same_lora():
  cfg = c3a.C3AConfig(block_size=4, target_modules=["query"], init_weights="gaussian")

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.query = nnx.Linear(8, 12, rngs=rngs)

  model = c3a.attach(Model(nnx.Rngs(0)), cfg, jax.random.key(1))
  w = model.query.c3a_kernel[...]
  from_model = c3a.to_lora(model, 4)
  from_params = c3a.to_lora({"query": {"kernel": jnp.ones((8, 12)), "c3a_kernel": w}}, 4)
  assert from_model.errors == from_params.errors
  np.testing.assert_array_equal(
    from_model.factors["query"]["lora_b"], from_params.factors["query"]["lora_b"]
  )


@pytest.mark.parametrize(
  "rank,match",
  [
    (0, "the LoRA rank must be a positive integer, got 0"),
    (-2, "must be a positive integer, got -2"),
    (2.0, "must be a positive integer, got 2.0"),
    (True, "must be a positive integer, got True"),
    (13, r"rank 13 is above every layer's full rank min\(d_in, d_out\); rank 12 is the largest"),
  ],
)
def test_bad_ranks_are_refused(rank, match, tmp_path):
  params = {"q": {"kernel": jnp.ones((12, 16)), "c3a_kernel": _kernel((4, 3, 4))}}
  cfg = c3a.C3AConfig(block_size=4, target_modules=["q"])
  with pytest.raises(ValueError, match=match):
    c3a.to_lora(params, rank)
  with pytest.raises(ValueError, match=match):
    c3a.save_adapter(str(tmp_path / "a"), params, cfg, as_lora=rank)
  assert not os.listdir(tmp_path)


def test_what_is_no_c3a_adapter_is_refused():
  with pytest.raises(ValueError, match="holds no c3a_kernel; call c3a.attach first"):
    c3a.to_lora({"q": {"kernel": jnp.ones((4, 4))}}, 2)
  with pytest.raises(ValueError, match=r"has shape \(2, 2, 1, 1, 4\); a C3A kernel is"):
    c3a.to_lora({"q": {"c3a_kernel": jnp.ones((2, 2, 1, 1, 4))}}, 2)
  with pytest.raises(TypeError, match="expected a params tree"):
    c3a.to_lora([1, 2], 2)


# test_peft_io's model and config, with kernels that are not small (gaussian).
CFG = PEFT_IO_CFG.replace(init_weights="gaussian", base_model_name_or_path="tiny-bert")


def test_save_as_lora_writes_a_peft_lora_adapter(tmp_path):
  params = c3a.attach(model_params(), CFG, jax.random.key(0))
  errors = c3a.save_adapter(str(tmp_path / "lora"), params, CFG, as_lora=16)
  c3a.save_adapter(str(tmp_path / "c3a"), params, CFG)
  layers = [f"encoder.layer.{i}.{n}" for i in range(2) for n in ("query", "ffn")]
  assert errors == dict.fromkeys(layers, 0.0)  # 16 = min(d_in, d_out) of every layer: exact
  config = json.load(open(tmp_path / "lora" / "adapter_config.json"))
  assert config == {
    "peft_type": "LORA",
    "task_type": "SEQ_CLS",
    "base_model_name_or_path": "tiny-bert",
    "revision": None,
    "inference_mode": True,
    "r": 16,
    "lora_alpha": 16,
    "use_rslora": False,
    "use_dora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "target_modules": layers,
    "layers_to_transform": None,
    "layers_pattern": None,
    "lora_dropout": 0.0,
    "fan_in_fan_out": False,
    "bias": "lora_only",
    "modules_to_save": ["classifier", "score"],
    "init_lora_weights": True,
  }
  lora = safetensors.numpy.load_file(tmp_path / "lora" / "adapter_model.safetensors")
  ours = safetensors.numpy.load_file(tmp_path / "c3a" / "adapter_model.safetensors")
  for layer in layers:
    w = ours.pop(f"{P}{layer}.c3a_kernel")
    a, b = lora.pop(f"{P}{layer}.lora_A.weight"), lora.pop(f"{P}{layer}.lora_B.weight")
    assert a.shape == (16, w.shape[1] * w.shape[2]) and b.shape == (w.shape[0] * w.shape[2], 16)
    # PEFT's delta: (lora_B @ lora_A) * lora_alpha / r, torch's (out, in) layout.
    np.testing.assert_allclose(b @ a, ops.delta_weight(w).T, atol=1e-6)
  # Biases and modules_to_save as the C3A writer stores them, to the bit.
  assert sorted(lora) == sorted(ours) and any(k.endswith("base_layer.bias") for k in lora)
  for key in lora:
    np.testing.assert_array_equal(lora[key], ours[key])


def test_a_lossy_export_warns_naming_the_worst_layer(tmp_path):
  params = c3a.attach(model_params(), CFG, jax.random.key(0))
  with pytest.warns(UserWarning, match=r"rank-2 LoRA differs from the C3A adapter in 4 of 4 "):
    errors = c3a.save_adapter(str(tmp_path / "a"), params, CFG, as_lora=2)
  worst = max(errors, key=errors.get)
  assert errors[worst] > 0.3
  lora = c3a.to_lora(params, 2)
  for layer, error in errors.items():
    assert error == pytest.approx(lora.errors[layer])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    c3a.save_adapter(str(tmp_path / "a"), params, CFG, as_lora=16)  # exact: no warning


def test_a_key_map_split_factors_each_part_on_its_own(tmp_path):
  # A fused k/v layer is two PyTorch Linears: each gets the best LoRA of its own delta, not
  # rows of the fused one's (which would be worse, and of rank 2r between them).
  params = {"attn": {"kv": {"kernel": jnp.ones((16, 32))}}}
  cfg = c3a.C3AConfig(block_size=4, target_modules=["kv"], init_weights="gaussian")
  adapted = c3a.attach(params, cfg, jax.random.key(0))
  fused = [(r"^attn\.kv$", ("attn.k_proj", "attn.v_proj"))]
  with pytest.warns(UserWarning, match="rank-3 LoRA differs"):
    errors = c3a.save_adapter(str(tmp_path / "a"), adapted, cfg, key_map=fused, as_lora=3)
  tensors = safetensors.numpy.load_file(tmp_path / "a" / "adapter_model.safetensors")
  delta = _dense(adapted["attn"]["kv"]["c3a_kernel"]).T  # (out, in)
  for i, name in enumerate(("k_proj", "v_proj")):
    part = delta[16 * i : 16 * (i + 1)]
    a, b = tensors[f"{P}attn.{name}.lora_A.weight"], tensors[f"{P}attn.{name}.lora_B.weight"]
    assert a.shape == (3, 16) and b.shape == (16, 3)
    assert errors[f"attn.{name}"] == pytest.approx(_error(part, b, a), abs=1e-6)
    assert errors[f"attn.{name}"] == pytest.approx(_best_error(part, 3), abs=1e-9)
  config = json.load(open(tmp_path / "a" / "adapter_config.json"))
  assert config["target_modules"] == ["attn.k_proj", "attn.v_proj"]


def test_a_stack_is_saved_as_one_lora_per_layer(tmp_path):
  params = {"layers": {"q": {"kernel": jnp.ones((3, 8, 8)), "c3a_kernel": _kernel((3, 2, 2, 4))}}}
  cfg = c3a.C3AConfig(block_size=4, target_modules=["q"], layers_pattern="layers")
  errors = c3a.save_adapter(str(tmp_path / "a"), params, cfg, as_lora=8)
  assert errors == {f"layers.{i}.q": 0.0 for i in range(3)}
  tensors = safetensors.numpy.load_file(tmp_path / "a" / "adapter_model.safetensors")
  for i in range(3):
    product = tensors[f"{P}layers.{i}.q.lora_B.weight"] @ tensors[f"{P}layers.{i}.q.lora_A.weight"]
    np.testing.assert_allclose(product, _dense(params["layers"]["q"]["c3a_kernel"][i]).T, atol=1e-6)


def test_conv1d_layers_are_refused_as_for_c3a(tmp_path):
  params = {"h": {"0": {"c_fc": {"kernel": jnp.ones((32, 16)), "bias": jnp.zeros(32)}}}}
  cfg = c3a.C3AConfig(block_size=8, target_modules=["c_fc"])
  params = c3a.attach(params, cfg, jax.random.key(0), model_type="gpt2")
  with pytest.raises(ValueError, match=r"store their kernel \(out, in\)"):
    c3a.save_adapter(str(tmp_path / "a"), params, cfg, as_lora=4)
  assert not os.listdir(tmp_path)
  # to_lora itself takes them: the delta's (d_in, d_out) meaning is the same.
  w = params["h"]["0"]["c_fc"]["c3a_kernel_out_in"]
  assert c3a.to_lora(params, 16).errors == {"h.0.c_fc": 0.0}
  f = c3a.to_lora(params, 16).factors["h"]["0"]["c_fc"]
  np.testing.assert_allclose(f["lora_a"] @ f["lora_b"], _dense(w), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Live: PEFT loads the export on the PyTorch model.


def _lora_merged(params, factors):
  """``params`` with each C3A layer's kernel plus its LoRA product: what the LoRA computes."""
  out = jax.tree.map(lambda x: x, params)

  def walk(node, f):
    for key, sub in f.items():
      if key == "lora_a":
        node["kernel"] = node["kernel"] + f["lora_a"] @ f["lora_b"]
        del node["c3a_kernel"]
      elif key != "lora_b":
        walk(node[key], sub)

  walk(out, factors)
  return out


@pytest.mark.interop
@pytest.mark.integration
def test_peft_loads_the_export_and_its_logits_approach_c3a_as_rank_grows(tmp_path):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  base_dir = str(tmp_path / "bert")
  config = transformers.BertConfig(**tiny.BERT)
  transformers.BertForSequenceClassification(config).eval().save_pretrained(base_dir)
  flax_model = transformers.FlaxBertForSequenceClassification.from_pretrained(
    base_dir, from_pt=True
  )
  ids = np.random.default_rng(0).integers(1, config.vocab_size, (3, 10)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 7:] = 0

  def jax_logits(params):
    return np.asarray(flax_model(ids, attention_mask=mask, params=params).logits)

  def peft_logits(directory):
    base = transformers.BertForSequenceClassification.from_pretrained(base_dir).eval()
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      pm = peft.PeftModel.from_pretrained(base, directory).eval()
    assert not [w for w in caught if "keys" in str(w.message)], [str(w.message) for w in caught]
    layers = {
      name: m
      for name, m in pm.base_model.model.named_modules()
      if isinstance(m, peft.tuners.lora.Linear)
    }
    with torch.no_grad():
      got = pm(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits
    return got.numpy(), layers

  # d_in, d_out: query and value 32 x 32, intermediate.dense 32 x 64; the head trains fully.
  cfg = c3a.C3AConfig(
    block_size=8,
    target_modules=["query", "value", "intermediate.dense"],
    init_weights="gaussian",
    task_type="SEQ_CLS",
  )
  params = c3a.attach(flax_model.params, cfg, jax.random.key(0))
  adapter, base = c3a.split(params)
  # Deltas (and a head) that matter: the head trains fully, so PEFT must load it too.
  params = c3a.combine(jax.tree.map(lambda w: 30 * w, adapter), base)
  with c3a.intercept():
    want = jax_logits(params)
  assert np.abs(want - jax_logits(flax_model.params)).max() > 1e-2

  diffs = {}
  for rank in (2, 16, 32):
    out = str(tmp_path / f"r{rank}")
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # the lossy ranks warn; tested above
      errors = c3a.save_adapter(out, params, cfg, as_lora=rank)
    got, layers = peft_logits(out)
    assert sorted(layers) == sorted(t.path for t in c3a.select(flax_model.params, cfg))
    for layer in layers.values():
      assert layer.r["default"] == rank and layer.scaling["default"] == 1.0
    # What PEFT computes is exactly the reported LoRA, at every rank.
    lora = c3a.to_lora(params, rank)
    assert lora.errors == errors
    np.testing.assert_allclose(got, jax_logits(_lora_merged(params, lora.factors)), atol=1e-4)
    diffs[rank] = float(np.abs(got - want).max())
    if rank < 32:
      assert min(errors.values()) > 0.05
  print(f"[lora export] max |PEFT LoRA - c3a-jax C3A| logits by rank: {diffs}")
  assert diffs[32] < 1e-4  # full rank: the C3A model's logits
  assert diffs[2] > diffs[16] > diffs[32] and diffs[2] > 1e-2


# ----------------------------------------------------------------------------------------------
# The command line


@pytest.fixture
def cache(tmp_path_factory, monkeypatch):
  monkeypatch.setenv("C3A_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "c3a-cache"))


@pytest.mark.integration
def test_export_lora_writes_the_run_as_lora_and_prints_each_layers_error(tmp_path, capsys, cache):
  run = tmp_path / "run"
  args = [f"output_dir={run}", "train.steps=5", "train.eval_every=5", "train.save_every=5"]
  assert cli.main(["train", "--quiet", *args]) == 0
  capsys.readouterr()
  out = tmp_path / "lora"
  assert cli.main(["export-lora", str(run), str(out), "--rank", "128"]) == 0
  printed = capsys.readouterr().out.splitlines()
  # fc0 is 64 -> 128 (full rank 64, zero-padded to 128), fc1 128 -> 128: both exact.
  assert printed[:3] == ["layer  relative error", "fc0          0.000000", "fc1          0.000000"]
  assert printed[3] == "rank 128: relative error max 0 (layer 'fc0'), mean 0 over 2 layers"
  config = json.load(open(out / "adapter_config.json"))
  assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 128, 128)
  assert config["target_modules"] == ["fc0", "fc1"] and config["modules_to_save"] == ["head"]
  tensors = safetensors.numpy.load_file(out / "adapter_model.safetensors")
  adapter, _ = c3a.load_adapter(str(run / "adapter"))
  for layer in ("fc0", "fc1"):
    product = tensors[f"{P}{layer}.lora_B.weight"] @ tensors[f"{P}{layer}.lora_A.weight"]
    np.testing.assert_allclose(product, _dense(adapter[layer]["c3a_kernel"]).T, atol=1e-6)
  np.testing.assert_array_equal(tensors[f"{P}head.weight"], np.asarray(adapter["head"]["kernel"]).T)

  assert cli.main(["export-lora", str(run), str(out), "--rank", "4"]) == 2
  assert "is not empty; pass --overwrite to write the LoRA adapter into it" in (
    capsys.readouterr().err
  )
  assert cli.main(["export-lora", str(run), str(out), "--rank", "4", "--overwrite"]) == 0
  printed = capsys.readouterr().out.splitlines()
  assert printed[3].startswith("rank 4: relative error max ") and "(layer 'fc" in printed[3]
  assert json.load(open(out / "adapter_config.json"))["r"] == 4
  assert cli.main(["export-lora", str(run), str(run / "lora"), "--rank", "4"]) == 2
  assert "is inside the run directory" in capsys.readouterr().err
  assert cli.main(["export-lora", str(run), str(tmp_path / "x"), "--rank", "129"]) == 2
  assert "rank 128 is the largest useful one" in capsys.readouterr().err
  assert not (tmp_path / "x").exists()
  unfinished = tmp_path / "unfinished"  # the digits default stopped before its adapter
  unfinished.mkdir()
  (unfinished / "config.yaml").write_text(yaml.safe_dump({"output_dir": str(unfinished)}))
  assert cli.main(["export-lora", str(unfinished), str(tmp_path / "x"), "--rank", "4"]) == 2
  assert "the run did not finish; continue it with c3a-jax train --resume" in (
    capsys.readouterr().err
  )


def test_export_lora_refuses_the_base_model_and_runs_of_other_modes(tmp_path, capsys):
  base, run = tmp_path / "base", tmp_path / "run"
  for d in (base, run):
    d.mkdir()
  (base / "config.json").write_text("{}")
  cases = [  # (train mode, OUT_DIR, message); --overwrite never writes into the base
    ("c3a", base, "is the base model's directory"),
    ("c3a", base / "lora", "is the base model's directory"),
    ("head", tmp_path / "a", "is a train.mode=head run; it holds no C3A adapter"),
  ]
  for mode, out, message in cases:
    config = {"task": "seq_cls", "model": {"name": str(base)}, "train": {"mode": mode}}
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "data": {"name": "x.csv"}}))
    assert cli.main(["export-lora", str(run), str(out), "--rank", "4", "--overwrite"]) == 2
    assert message in capsys.readouterr().err
  assert sorted(os.listdir(base)) == ["config.json"] and not (tmp_path / "a").exists()
