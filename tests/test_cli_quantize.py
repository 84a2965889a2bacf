"""The CLI's model.quantize (QC3A: C3A over a frozen base that Qwix quantized): the section's
validation, what it refuses, and runs of both routes (transformers' Flax models, Tunix's NNX
models) that say how their base was stored."""

import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import c3a_jax as c3a
from c3a_jax import cli
from c3a_jax.cli import runner
from c3a_jax.cli.experiment import Experiment, QuantizeSpec
from c3a_jax.cli.job import Job, describe_quantized, quantize_errors, quantized_paths

pytest.importorskip("qwix")
# Qwix 0.1 reads NNX's deprecated VariableState alias once per weight.
pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed:DeprecationWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUB = {"task": "seq_cls", "model": {"name": "m"}, "data": {"name": "d"}}


def experiment(quantize, **sections):
  return Experiment.from_dict({**HUB, "model": {"name": "m", "quantize": quantize}, **sections})


def train(*args):
  return cli.main(["train", "--quiet", *args])


# ----------------------------------------------------------------------------------------------
# The section.


def test_the_section_and_its_short_form():
  spec = experiment({"weights": "int4", "tile_size": 64}).model.quantize
  assert spec == QuantizeSpec(weights="int4", tile_size=64)
  assert experiment("nf4").model.quantize == QuantizeSpec(weights="nf4")  # weights alone
  assert Experiment.from_dict(HUB).model.quantize is None  # the default: the base as loaded
  # Overrides reach into the section, and leave the caller's mapping as it was.
  d = {**HUB, "model": {"name": "m", "quantize": {"weights": "int8"}}}
  exp = Experiment.from_dict(d, ["model.quantize.tile_size=32", "model.quantize.weights=nf4"])
  assert exp.model.quantize == QuantizeSpec(weights="nf4", tile_size=32)
  assert d["model"]["quantize"] == {"weights": "int8"}
  assert Experiment.from_dict(HUB, ["model.quantize=float8_e4m3fn"]).model.quantize.weights == (
    "float8_e4m3fn"
  )
  assert set(c3a.quantize.WEIGHTS) == {"int8", "int4", "nf4", "float8_e4m3fn"}


@pytest.mark.parametrize(
  "quantize, sections, match",
  [
    (
      {"weights": "int2"},
      {},
      "model.quantize.weights: Input should be 'int8', 'int4', 'nf4' or 'float8_e4m3fn', got "
      "'int2'",
    ),
    ({"tile_size": 32}, {}, "model.quantize.weights: Field required"),
    (
      {"weights": "int8", "tile_size": 0},
      {},
      "model.quantize.tile_size: Input should be greater than or equal to 1, got 0",
    ),
    (
      {"weights": "int8", "tile_size": True},
      {},
      "model.quantize.tile_size: Input should be a valid integer, got True",
    ),
    (
      {"weights": "int8", "module_path": "(["},
      {},
      r"model.quantize.module_path: '\(\[' is not a regular expression \(unterminated",
    ),
    (
      {"weights": "int8", "bits": 4},
      {},
      r"unknown key model.quantize.bits \(model.quantize has: module_path, tile_size, weights\)",
    ),
    (8, {}, "model.quantize: a section .* or one of int8, int4, nf4, float8_e4m3fn, got 8"),
    (
      "int8",
      {"train": {"mode": "full"}},
      "train.mode 'full' trains every weight, but model.quantize stores the frozen base in int8",
    ),
    (
      "nf4",
      {"train": {"strategy": "fold"}},
      "train.strategy 'fold' adds the C3A delta into each kernel, which model.quantize stores in "
      "nf4",
    ),
  ],
)
def test_bad_settings_are_one_line_naming_the_key(quantize, sections, match):
  with pytest.raises(ValueError, match=match) as e:
    experiment(quantize, **sections)
  assert "\n" not in str(e.value)


def test_head_mode_and_other_strategies_are_allowed():
  assert experiment("int8", train={"mode": "head"}).train.mode == "head"
  assert experiment("int8", train={"strategy": "dense"}).train.strategy == "dense"


def test_the_digits_task_refuses_it(tmp_path, capsys):
  assert train("model.quantize=int8", f"output_dir={tmp_path / 'run'}") == 2
  err = capsys.readouterr().err
  assert "task 'digits' runs its built-in MLP" in err and "uses no model.quantize" in err
  assert not (tmp_path / "run").exists()


def test_the_default_module_path_leaves_out_what_trains():
  spec = QuantizeSpec(weights="int8", tile_size=32)
  assert spec.rule_path() == ".*"
  rule = spec.rule_path(("classifier", "pooler.dense"))
  quantized = lambda path: re.fullmatch(rule, path) is not None  # as Qwix matches it
  assert quantized("bert/encoder/layer/0/attention/self/query")
  assert quantized("bert/pooler/dense_2") and quantized("classifier_norm")
  assert not quantized("classifier") and not quantized("classifier/out_proj")
  assert not quantized("bert/pooler/dense") and not quantized("roberta/classifier/dense")
  # As PEFT (and c3a.split) match modules_to_save: a path that ends with an entry.
  assert not quantized("my_classifier")
  assert not re.fullmatch(spec.rule_path(("head",)), "lm_head")
  assert QuantizeSpec(weights="nf4", module_path="layers/.*").rule_path(("head",)) == "layers/.*"
  # Tunix's route: its projections (not a tied embedding, nor an lm_head), as c3a.quantize advises.
  tunix = spec.rule_path((), "tunix")
  assert re.fullmatch(tunix, "layers/3/attn/q_proj") and re.fullmatch(tunix, "layers/0/kv_einsum")
  assert not re.fullmatch(tunix, "embedder") and not re.fullmatch(tunix, "lm_head")
  assert not re.fullmatch(spec.rule_path(("down_proj",), "tunix"), "layers/0/mlp/down_proj")
  assert spec.describe((), "tunix") == "int8 (tile 32), Qwix PTQ, every *_proj and *_einsum layer"
  assert spec.label() == "int8 (tile 32)"
  assert spec.describe(("classifier",)) == (
    "int8 (tile 32), Qwix PTQ, every linear layer but classifier"
  )
  assert QuantizeSpec(weights="nf4", module_path="fc.*").describe(("head",)) == (
    "nf4 (per channel), Qwix PTQ, the layers matching 'fc.*'"
  )


def test_help_lists_the_section(capsys):
  with pytest.raises(SystemExit):
    cli.main(["train", "--help"])
  lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
  assert "section | None = None" in lines["model.quantize"]
  assert "'int8' | 'int4' | 'nf4' | 'float8_e4m3fn' = (required)" in lines["model.quantize.weights"]
  assert "int | None = None" in lines["model.quantize.tile_size"]
  assert "c3a.modules_to_save" in lines["model.quantize.module_path"]


def test_the_shipped_qc3a_config_is_valid():
  exp = Experiment.load(os.path.join(ROOT, "configs", "qwen3_tunix_int8.yaml"))
  assert exp.model.library == "tunix" and exp.model.quantize.weights == "int8"
  assert exp.train.mode == "c3a"


def test_what_qwix_cannot_quantize_is_one_line_naming_the_settings():
  spec = QuantizeSpec(weights="int4", tile_size=16)
  with pytest.raises(
    ValueError,
    match=r"^model.quantize \(weights=int4, tile_size=16\): Qwix could "
    r"not quantize the base: \(4, 8, 32\) cannot be tiled as \{1: 16\}.$",
  ):
    with quantize_errors(spec):
      raise ValueError("(4, 8, 32) cannot be tiled as {1: 16}.\nmore")
  # A convolution (a ViT's patch embedding): how to leave it out.
  with pytest.raises(ValueError, match=r"requires same act_qtype.*; leave the convolutions out "):
    with quantize_errors(spec):
      raise ValueError("conv_general_dilated requires same act_qtype and weight_qtype.")


# ----------------------------------------------------------------------------------------------
# The runner over a quantized base, on a tiny linen model (fast).


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32, name="fc0")(x))
    return nn.Dense(3, name="head")(nn.relu(nn.Dense(32, name="fc1")(x)))


def mlp_job(exp):
  """A Job as the routes build it: the model quantized as ``exp.model.quantize`` says."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 16)).astype(np.float32)
  data = {"x": x, "labels": (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1)}
  model = MLP()
  params = model.init(jax.random.key(0), jnp.ones((1, 16)))["params"]
  spec = exp.model.quantize
  qmodel, qparams = c3a.quantize.quantize_linen(
    model,
    params,
    jnp.ones((1, 16)),
    weights=spec.weights,
    tile_size=spec.tile_size,
    module_path=spec.rule_path(exp.c3a.modules_to_save),
  )
  return Job(
    logits_fn=lambda p, batch, rng, train: qmodel.apply({"params": p}, batch["x"]),
    params=qparams,
    train_data=data,
    eval_data=data,
    quantized=describe_quantized(exp, qparams),
  )


def mlp_experiment(tmp_path, quantize, **train):
  return Experiment.from_dict(
    {
      **HUB,
      "model": {"name": "m", "quantize": quantize},
      "c3a": {"block_size": 8, "target_modules": ["fc0", "fc1"], "modules_to_save": ["head"]},
      "train": {"steps": 6, "batch_size": 16, "lr": 0.3, "head_lr": 1e-2, "log_every": 3, **train},
      "output_dir": str(tmp_path / "run"),
    }
  )


def test_a_run_over_a_quantized_base_says_how_it_was_stored(tmp_path):
  # float8 weights under bfloat16 compute: the cast of the frozen base leaves them as stored.
  spec = {"weights": "float8_e4m3fn", "tile_size": 8}
  exp = mlp_experiment(tmp_path, spec, compute_dtype="bfloat16")
  job = mlp_job(exp)
  assert quantized_paths(job.params) == ["fc0/kernel", "fc1/kernel"]  # not the head: it trains
  summary = runner.run(exp, job, quiet=True, log=lambda m: None)
  out = tmp_path / "run"
  assert summary["quantized_base"] == (
    "float8_e4m3fn (tile 8), Qwix PTQ, every linear layer but head: 2 weights"
  )
  assert json.load(open(out / "summary.json"))["quantized_base"] == summary["quantized_base"]
  assert runner.run_name(exp) == "C3A over float8_e4m3fn (tile 8)"  # the plot's title names it
  losses = [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]
  assert all(np.isfinite(losses))
  # A plain PEFT adapter: C3A kernels and the head, no quantized weight.
  adapter, cfg = c3a.load_adapter(str(out / "adapter"))
  assert set(adapter) == {"fc0", "fc1", "head"} and cfg.block_size == 8


def test_a_quantized_weight_that_would_train_is_refused(tmp_path):
  exp = mlp_experiment(tmp_path, {"weights": "int8", "module_path": ".*"}, mode="head")
  with pytest.raises(ValueError, match=r"module_path '\.\*' quantizes head/kernel, which "):
    runner.run(exp, mlp_job(exp), quiet=True, log=lambda m: None)
  assert not (tmp_path / "run").exists()
  exp = mlp_experiment(tmp_path, {"weights": "int8", "module_path": "nothing"})
  with pytest.raises(ValueError, match="module_path 'nothing' matches none of the model's linear"):
    mlp_job(exp)


# ----------------------------------------------------------------------------------------------
# Both routes end to end, on tiny models made locally.


@pytest.mark.integration
def test_seq_cls_over_a_quantized_base(tmp_path, capsys):
  transformers = pytest.importorskip("transformers")
  from tests import tiny
  from tests.test_cli import seq_cls_config, tokenizer

  d = tmp_path / "bert"
  config = transformers.BertConfig(**dict(tiny.BERT, vocab_size=32, num_labels=2))
  transformers.FlaxBertForSequenceClassification(config, seed=0).save_pretrained(str(d))
  tokenizer(d)
  path = seq_cls_config(tmp_path, d)
  quantize = ["model.quantize.weights=int8", "model.quantize.tile_size=16"]
  assert train("--config", str(path), *quantize) == 0
  out = capsys.readouterr().out
  want = "int8 (tile 16), Qwix PTQ, every linear layer but classifier, score: 13 weights"
  assert f"base: {want}\n" in out, out
  run = tmp_path / "run"
  summary = json.load(open(run / "summary.json"))
  assert summary["quantized_base"] == want and summary["eval_accuracy"] > 0.9
  # eval scores the adapter over the quantized base, as the run did.
  assert cli.main(["eval", str(run)]) == 0
  assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(summary["eval_accuracy"])
  # The adapter loads onto the full-precision model; merge folds it into that.
  model = transformers.FlaxBertForSequenceClassification.from_pretrained(str(d))
  adapter, _ = c3a.load_adapter(str(run / "adapter"), model.params)
  assert cli.main(["merge", str(run), str(tmp_path / "merged")]) == 0
  assert "merged into the full-precision base" in capsys.readouterr().err
  merged = transformers.FlaxBertForSequenceClassification.from_pretrained(str(tmp_path / "merged"))
  ids = np.asarray([[2, 9, 8, 11, 13, 7, 3]])
  with c3a.intercept():
    adapted = model(ids, params=c3a.combine(adapter, model.params)).logits
  np.testing.assert_allclose(merged(ids).logits, adapted, atol=1e-5)
  # Head-only training over the quantized base; a module_path that quantizes the head is refused.
  head = [*quantize, "train.mode=head", "train.steps=4", f"output_dir={tmp_path / 'head'}"]
  assert train("--config", str(path), *head) == 0
  assert "quantized_base" in json.load(open(tmp_path / "head" / "summary.json"))
  capsys.readouterr()
  every = [*head, "model.quantize.module_path=.*", f"output_dir={tmp_path / 'every'}"]
  assert train("--config", str(path), *every) == 2
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert last.startswith("c3a-jax train: error: model.quantize.module_path '.*' quantizes ")
  assert "classifier/kernel, which train.mode head trains" in last
  assert not (tmp_path / "every").exists()


def qwen3_checkpoint(path, tied=False, seed=0):
  """A tiny Qwen 3 checkpoint as Hugging Face saves it (safetensors), made without torch."""
  from safetensors.numpy import save_file

  h, i, heads, kv, hd, v = 32, 64, 4, 2, 8, 64
  rng = np.random.default_rng(seed)
  w = lambda *shape: (rng.standard_normal(shape) * 0.1).astype(np.float32)
  tensors = {"model.embed_tokens.weight": w(v, h), "model.norm.weight": 1 + w(h)}
  if not tied:
    tensors["lm_head.weight"] = w(v, h)
  for layer in range(2):
    p = f"model.layers.{layer}."
    tensors |= {
      p + "input_layernorm.weight": 1 + w(h),
      p + "post_attention_layernorm.weight": 1 + w(h),
      p + "mlp.gate_proj.weight": w(i, h),
      p + "mlp.up_proj.weight": w(i, h),
      p + "mlp.down_proj.weight": w(h, i),
      p + "self_attn.q_proj.weight": w(heads * hd, h),
      p + "self_attn.k_proj.weight": w(kv * hd, h),
      p + "self_attn.v_proj.weight": w(kv * hd, h),
      p + "self_attn.o_proj.weight": w(h, heads * hd),
      p + "self_attn.q_norm.weight": 1 + w(hd),
      p + "self_attn.k_norm.weight": 1 + w(hd),
    }
  path.mkdir(parents=True)
  save_file(tensors, str(path / "model.safetensors"))
  config = dict(
    model_type="qwen3",
    vocab_size=v,
    hidden_size=h,
    intermediate_size=i,
    num_hidden_layers=2,
    num_attention_heads=heads,
    num_key_value_heads=kv,
    head_dim=hd,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    tie_word_embeddings=tied,
    max_position_embeddings=64,
  )
  (path / "config.json").write_text(json.dumps(config))
  return path


@pytest.mark.integration
def test_the_shipped_tunix_config_over_a_quantized_base(tmp_path, capsys):
  """configs/qwen3_tunix_int8.yaml, its model and data swapped for local ones (as a user
  offline would), its sizes for the tiny model's."""
  pytest.importorskip("tunix.models.qwen3.model")
  from tests.test_cli import sentences, tokenizer, write_jsonl

  base = qwen3_checkpoint(tmp_path / "qwen3", tied=True)  # Qwen3-0.6B ties its embeddings
  tokenizer(base)
  rows = [
    {"instruction": "rate the film", "input": "", "output": r["sentence"]} for r in sentences(32, 2)
  ]
  overrides = [
    f"model.name={base}",
    f"data.name={write_jsonl(tmp_path / 'train.json', rows)}",
    "data.max_length=12",
    "c3a.block_size=8",
    "model.quantize.tile_size=8",  # the tiny model's head_dim
    "train.steps=8",
    "train.batch_size=8",
    "train.warmup_steps=0",
    "train.lr=0.5",
    "train.log_every=4",
    f"output_dir={tmp_path / 'run'}",
  ]
  assert train("--config", "configs/qwen3_tunix_int8.yaml", *overrides) == 0
  out = capsys.readouterr().out
  run = tmp_path / "run"
  summary = json.load(open(run / "summary.json"))
  assert summary["quantized_base"] == (
    "int8 (tile 8), Qwix PTQ, every *_proj and *_einsum layer: 14 weights"  # 2 x 7 projections
  )
  assert f"base: {summary['quantized_base']}" in out
  losses = [json.loads(line)["loss"] for line in open(run / "metrics.jsonl")]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  # A PEFT adapter under Hugging Face's names; merge writes the full-precision checkpoint.
  cfg = json.load(open(run / "adapter" / "adapter_config.json"))
  assert cfg["peft_type"] == "C3A" and len(cfg["target_modules"]) == 4  # 2 layers' q and v
  assert all(name.startswith("model.layers.") for name in cfg["target_modules"])
  assert cli.main(["merge", str(run), str(tmp_path / "merged")]) == 0
  assert (tmp_path / "merged" / "model.safetensors").exists()
  # A tile that does not divide a layer's input is one line naming the setting.
  capsys.readouterr()
  bad = [*overrides, "model.quantize.tile_size=16", f"output_dir={tmp_path / 'bad'}"]
  assert train("--config", "configs/qwen3_tunix_int8.yaml", *bad) == 2
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert last.startswith("c3a-jax train: error: model.quantize (weights=int8, tile_size=16): ")
  assert "Qwix could not quantize the base: " in last
