"""C3AConfig: PEFT's fields and defaults, validation, adapter_config.json; the CLI's experiment
config around it."""

import dataclasses
import glob
import json
import os
import re
import time

import numpy as np
import pydantic
import pytest

import c3a_jax as c3a
from c3a_jax import C3AConfig, cli
from c3a_jax.cli.experiment import Experiment


def test_defaults_are_peft_defaults():
  cfg = C3AConfig()
  assert cfg.block_size == 256 and cfg.block_size_pattern == {}
  assert cfg.target_modules is None and cfg.bias == "none"
  assert cfg.init_weights == "xavier_uniform" and cfg.modules_to_save is None


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(block_size=0), "block_size must be a positive integer, got 0"),
    (dict(block_size=-4), "block_size must be a positive integer"),
    (dict(block_size=2.0), "block_size must be a positive integer"),
    (dict(block_size=True), "block_size must be a positive integer"),
    (dict(bias="lora_only"), r"bias must be one of \('none', 'all', 'c3a_only'\)"),
    (dict(init_weights="orthogonal"), "init_weights must be one of"),
    (dict(init_weights=1), "init_weights must be one of"),
    (dict(block_size_pattern={"query": 0}), r"block_size_pattern\['query'\]"),
    (dict(block_size_pattern=[("q", 4)]), "block_size_pattern must be a dict"),
    (dict(block_size_pattern={"q(": 4}), "not a valid regex"),
    (dict(target_modules=".*(query"), "target_modules .* not a valid regex"),
    (dict(target_modules=[1, 2]), "target_modules must be"),
    (dict(modules_to_save="classifier"), None),  # a single name is fine
    (dict(modules_to_save=[3]), "modules_to_save must be a list"),
    (dict(target_modules="q", layers_to_transform=[0]), "need target_modules as a list"),
    (dict(target_modules=["q"], layers_to_transform=[-1]), "layers_to_transform"),
    (dict(target_modules=["q"], layers_to_transform="0"), "layers_to_transform"),
  ],
)
def test_bad_values_are_errors_naming_the_field(kwargs, match):
  if match is None:
    assert C3AConfig(**kwargs).modules_to_save == ("classifier",)
    return
  with pytest.raises(ValueError, match=match):
    C3AConfig(**kwargs)


def test_list_fields_are_normalised_and_hashable():
  cfg = C3AConfig(
    target_modules=["query", "value", "query"],
    modules_to_save=["classifier"] * 2,
    block_size_pattern={"value": 8},
  )
  assert cfg.target_modules == ("query", "value") and cfg.modules_to_save == ("classifier",)
  assert C3AConfig(target_modules={"value", "query"}).target_modules == ("query", "value")
  assert hash(cfg) == hash(
    C3AConfig(
      target_modules=("query", "value"),
      modules_to_save=("classifier",),
      block_size_pattern={"value": 8},
    )
  )
  assert cfg.replace(block_size=64).block_size == 64
  with pytest.raises(ValueError, match="block_size"):
    cfg.replace(block_size=0)


def test_json_round_trip(tmp_path):
  cfg = C3AConfig(
    block_size=64,
    block_size_pattern={"down_proj": 32},
    target_modules=["q", "v"],
    layers_to_transform=[0, 2],
    layers_pattern="layers",
    bias="c3a_only",
    modules_to_save=["lm_head"],
    init_weights=True,
    task_type="CAUSAL_LM",
  )
  cfg.save(str(tmp_path))
  d = json.loads((tmp_path / "adapter_config.json").read_text())
  assert d["peft_type"] == "C3A" and d["target_modules"] == ["q", "v"]
  assert d["layers_to_transform"] == [0, 2] and d["init_weights"] is True
  assert C3AConfig.load(str(tmp_path)) == cfg
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_reads_peft_written_config(shared_fixtures):
  cfg = C3AConfig.load(os.path.join(shared_fixtures, "peft_roberta_seqcls", "adapter"))
  assert cfg.block_size == 16 and cfg.task_type == "SEQ_CLS"
  assert set(cfg.target_modules) == {"query", "value", "intermediate.dense"}
  assert cfg.modules_to_save == ("classifier", "score")  # PEFT wrote "classifier" twice


def test_load_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="adapter_config.json does not exist"):
    C3AConfig.load(str(tmp_path))
  (tmp_path / "adapter_config.json").write_text("{not json")
  with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
    C3AConfig.load(str(tmp_path))
  (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
  with pytest.raises(ValueError, match="peft_type is 'LORA', not 'C3A'"):
    C3AConfig.load(str(tmp_path))
  (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "C3A", "bias": "x"}))
  with pytest.raises(ValueError, match=r"adapter_config.json: C3AConfig.bias must be one of"):
    C3AConfig.load(str(tmp_path))
  (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "C3A", "new_field": 1}))
  with pytest.warns(UserWarning, match="new_field"):
    assert C3AConfig.load(str(tmp_path)).block_size == 256


def test_public_api_names():
  for name in [
    "C3AConfig",
    "attach",
    "intercepted",
    "intercept",
    "split",
    "combine",
    "optimizer",
    "merge",
    "unmerge",
    "save_adapter",
    "load_adapter",
    "to_lora",
    "summary",
    "labels",
    "select",
  ]:
    assert callable(getattr(c3a, name)), name
  assert callable(c3a.ops.block_circulant_matmul) and callable(c3a.ops.delta_weight)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(task_type="seq_cls"), r"task_type must be one of \('SEQ_CLS'"),
    (dict(target_modules=["q"], layers_pattern="la(yer"), "layers_pattern .* not a valid regex"),
    (dict(modules_to_save=["cls("]), "modules_to_save .* not a valid regex"),
  ],
)
def test_more_bad_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    C3AConfig(**kwargs)


def test_all_linear_in_any_case():
  assert C3AConfig(target_modules="ALL-LINEAR").target_modules == "all-linear"


def test_numpy_integers_are_accepted_as_sizes():
  # A block size computed with numpy (e.g. from a layer's shape) is an np.int64.
  cfg = C3AConfig(block_size=np.int64(16), block_size_pattern={"q": np.int32(8)})
  assert cfg.block_size == 16 and type(cfg.block_size) is int
  assert cfg.block_size_pattern == {"q": 8} and type(cfg.block_size_pattern["q"]) is int
  assert json.loads(json.dumps(cfg.to_dict()))["block_size"] == 16  # still serialisable


# ----------------------------------------------------------------------------------------------
# The CLI's experiment config (c3a_jax.cli.experiment): pydantic sections around C3AConfig.

TRAIN_KEYS = "batch_size, compute_dtype, eval_every, grad_accum, head_lr, keep_checkpoints"
SEQ_CLS = {"task": "seq_cls", "model": {"name": "m"}, "data": {"name": "d"}}


@pytest.mark.parametrize(
  "config,message",
  [
    ({"train": {"lr": float("nan")}}, "train.lr: Input should be a finite number, got nan"),
    ({"train": {"weight_decay": float("-inf")}}, "train.weight_decay: .* finite number, got -inf"),
    ({"train": {"lr": True}}, "train.lr: Input should be a valid number, got True"),
    ({"train": {"steps": True}}, "train.steps: Input should be a valid integer, got True"),
    ({"train": {"batch_size": 1.5}}, "train.batch_size: Input should be a valid integer, got 1.5"),
    ({"data": {"max_length": "64"}}, "data.max_length: Input should be a valid integer, got '64'"),
    ({"model": {"from_pt": 1}}, "model.from_pt: Input should be a valid boolean, got 1"),
    ({"train": {"seed": 2**32}}, "train.seed: Input should be less than 4294967296, got 4294"),
    ({"data": {"max_eval_examples": 0}}, "data.max_eval_examples: .* greater than or equal to 1"),
    ({"train": {"warmup_steps": -1}}, "train.warmup_steps: .* greater than or equal to 0"),
    ({"train": {"lr_c3a": 1}}, rf"unknown key train.lr_c3a \(train has: {TRAIN_KEYS}, "),
    ({"dataset": {}}, r"unknown key dataset \(the top level has: c3a, data, model, output_dir,"),
    ({"train": [1, 2]}, r"train: Input should be a valid dictionary .*, got \[1, 2\]"),
    ({"c3a": "big"}, "c3a: Input should be a valid dictionary, got 'big'"),
    (
      {"train": {"mode": "lora"}},
      "train.mode: Input should be 'c3a', 'head' or 'full', got 'lora'",
    ),
    ({"c3a": {"rank": 8}}, r"c3a: .* keyword argument 'rank' \(c3a has: block_size, block_size_"),
    ({"c3a": {"block_size": -2}}, "c3a: C3AConfig.block_size must be a positive integer, got -2"),
    ({"train": {"strategy": "fastest"}}, "train.strategy: strategy='fastest' is not one of"),
    ({"train": {"grad_accum": 3}}, "train.grad_accum=3 must divide train.batch_size=32"),
    ({**SEQ_CLS, "data": {}}, "task 'seq_cls' needs data.name"),
    ({**SEQ_CLS, "model": {"name": "m", "library": "tunix"}}, "'tunix' runs causal LMs"),
    ({"train": {"steps": 0, "lr": -1}}, r"train.steps: .*, got 0 \(and 1 more\)"),
  ],
)
def test_experiment_errors_are_one_line_naming_file_key_and_value(config, message):
  with pytest.raises(ValueError) as e:
    Experiment.from_dict(config, source="exp.yaml")
  text = str(e.value)
  assert text.startswith("exp.yaml: ") and "\n" not in text and len(text) < 400, text
  assert re.search(message, text), text


def test_experiment_reads_what_yaml_writes():
  overrides = ["train.lr=3e-1", "train.head_lr=2", "train.seed=4294967295", "data.num_labels=null"]
  exp = Experiment.from_dict({}, overrides)
  assert exp.train.lr == 0.3 and exp.train.head_lr == 2.0 and type(exp.train.head_lr) is float
  assert exp.train.seed == 2**32 - 1 and exp.data.num_labels is None
  with pytest.warns(DeprecationWarning, match="train.strategy: strategy='merged' is deprecated"):
    assert Experiment.from_dict({"train": {"strategy": "merged"}}).train.strategy == "fold"
  assert (
    Experiment.from_dict({"train": {"batch_size": 8, "grad_accum": 4}}).train.eval_batch_size == 2
  )
  with pytest.raises(pydantic.ValidationError, match="frozen"):
    exp.train.lr = 1.0


@pytest.mark.parametrize("where", ["train.lr", "train", "task", "c3a", "data.max_length"])
def test_experiment_errors_show_an_alias_bomb_briefly_and_fast(where, alias_bomb):
  *sections, leaf = where.split(".")
  config = node = {}
  for section in sections:
    node = node.setdefault(section, {})
  node[leaf] = alias_bomb
  start = time.perf_counter()
  with pytest.raises(ValueError, match=rf"^config: {where}: Input should be .*, got \[\[") as e:
    Experiment.from_dict(config)
  assert len(str(e.value)) < 250 and time.perf_counter() - start < 5


def test_an_alias_bomb_inside_the_c3a_section_is_shown_bounded(alias_bomb):
  start = time.perf_counter()  # C3AConfig's own errors bound their values too
  with pytest.raises(ValueError, match=r"config: c3a: C3AConfig.layers_to_transform .*\[\[") as e:
    Experiment.from_dict({"c3a": {"layers_to_transform": alias_bomb}})
  assert len(str(e.value)) < 400 and time.perf_counter() - start < 5


def test_every_shipped_config_loads_and_round_trips():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  paths = sorted(glob.glob(os.path.join(root, "configs", "*.yaml")))
  assert len(paths) >= 10
  for path in paths:
    exp = Experiment.load(path)
    d = exp.to_dict()
    assert list(d) == ["task", "model", "data", "c3a", "train", "output_dir"], path
    assert "peft_type" not in d["c3a"] and isinstance(d["train"], dict)
    assert Experiment.from_dict(d) == exp, path


def test_train_help_lists_every_config_key_with_its_type_and_default(capsys):
  with pytest.raises(SystemExit) as stop:
    cli.main(["train", "--help"])
  assert stop.value.code == 0
  lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
  expected = {"task": "digits", "output_dir": "runs/c3a-digits"}
  for name in ("model", "data", "train"):
    section = Experiment.model_fields[name].annotation
    expected |= {f"{name}.{k}": f.default for k, f in section.model_fields.items()}
  for f in dataclasses.fields(C3AConfig):
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    expected[f"c3a.{f.name}"] = default
  for key, default in expected.items():
    assert f" = {default!r}" in lines[key], lines.get(key)
  assert "float = 0.1  C3A's learning rate" in lines["train.lr"]
  assert "int = 1000  optimizer steps" in lines["train.steps"]


def test_a_config_file_that_is_not_utf8_deep_or_huge_is_one_error_naming_it(tmp_path):
  """json.load's own errors (UnicodeDecodeError, RecursionError, the int digit limit) name no
  file; each is one ValueError that does."""
  path = tmp_path / "adapter_config.json"
  cases = [
    (b'{"peft_type": "C3A", "base_model_name_or_path": "caf\xe9"}', "is not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000, "nests deeper than"),
    (b'{"block_size": ' + b"9" * 5000 + b"}", "is not valid JSON: .*Exceeds the limit"),
  ]
  for data, match in cases:
    path.write_bytes(data)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} {match}"):
      C3AConfig.load(str(tmp_path))


def test_merge_checkpoint_names_a_bad_shard_index(tmp_path):
  base, adapter = tmp_path / "base", tmp_path / "adapter"
  base.mkdir()
  c3a.C3AConfig(block_size=4, target_modules=["fc"]).save(str(adapter))
  index = base / "model.safetensors.index.json"
  for data, match in [
    (b"\xff{}", "is not UTF-8 text"),
    (b"[" * 100_000, "nests deeper than"),
    (b"{}", r"has no 'weight_map'"),
  ]:
    index.write_bytes(data)
    with pytest.raises(ValueError, match=rf"{re.escape(str(index))} {match}"):
      c3a.merge_checkpoint(str(base), str(adapter), str(tmp_path / "out"))


@pytest.mark.parametrize(
  "override", ["model.name=roberta-base", "data.name=glue", "model.from_pt=true"]
)
def test_a_model_or_data_setting_on_the_digits_task_is_refused(override):
  # The digits task runs its own MLP and data: a model or data setting would be ignored.
  base = {"task": "digits", "output_dir": "runs/x"}
  Experiment.from_dict(base)
  key = override.split("=")[0]
  with pytest.raises(ValueError, match=rf"cfg: task 'digits' .* uses no {re.escape(key)}; drop"):
    Experiment.from_dict(base, [override], source="cfg")
