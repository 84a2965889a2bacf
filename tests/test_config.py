"""C3AConfig: PEFT's fields and defaults, validation, adapter_config.json."""

import json
import os

import numpy as np
import pytest

import c3a_jax as c3a
from c3a_jax import C3AConfig


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
    "wrap",
    "intercept",
    "split",
    "combine",
    "optimizer",
    "merge",
    "unmerge",
    "save_adapter",
    "load_adapter",
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
