"""c3a-jax against the project's own PEFT fixtures (tests/fixtures/peft_bert_seqcls/).

The fixtures were made by tests/fixtures/make_fixtures.py with PyTorch transformers and PEFT
0.21.2: a tiny BERT for sequence classification, a C3A adapter saved by PEFT (classifier in
modules_to_save, a block_size_pattern giving three block sizes) and the logits PyTorch computed.
These tests need no torch: the base loads from safetensors with ``from_pt=True``.
"""

import json
import os

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import safetensors.numpy  # noqa: E402

import c3a_jax as c3a  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "peft_bert_seqcls")
ATOL = 1e-5


@pytest.fixture(scope="module")
def fx():
  model = transformers.FlaxBertForSequenceClassification.from_pretrained(
    os.path.join(FIXTURE, "base"), from_pt=True
  )
  io = dict(np.load(os.path.join(FIXTURE, "io.npz")))
  adapter, cfg = c3a.load_adapter(os.path.join(FIXTURE, "adapter"), model.params)
  return model, io, adapter, cfg


def _logits(model, params, io, *, adapter):
  kw = dict(attention_mask=io["attention_mask"], params=params)
  if adapter:
    with c3a.intercept():
      return np.asarray(model(io["input_ids"], **kw).logits)
  return np.asarray(model(io["input_ids"], **kw).logits)


def _close(got, want, what):
  diff = float(np.abs(got - want).max())
  print(f"[own fixtures] {what}: max abs diff {diff:.3g}")
  assert diff <= ATOL, f"{what}: max |c3a-jax - PEFT| = {diff:.3g} > {ATOL}"
  return diff


def test_fixture_is_meaningful(fx):
  # The adapter changes the logits far beyond the tolerance, so the checks below are not vacuous.
  _, io, _, _ = fx
  assert np.abs(io["logits_adapter"] - io["logits_base"]).max() > 100 * ATOL
  assert io["attention_mask"].min() == 0


def test_base_logits(fx):
  model, io, _, _ = fx
  _close(_logits(model, model.params, io, adapter=False), io["logits_base"], "base")


def test_loaded_config_and_kernels(fx):
  _, _, adapter, cfg = fx
  assert cfg.block_size == 8
  assert set(cfg.target_modules) == {"query", "value", "intermediate.dense"}
  assert "classifier" in cfg.modules_to_save
  assert cfg.task_type == "SEQ_CLS"
  layers = adapter["bert"]["encoder"]["layer"]
  # block_size_pattern: intermediate.dense -> 16, layer 1's value -> 4, everything else 8.
  assert layers["0"]["intermediate"]["dense"]["c3a_kernel"].shape == (4, 2, 16)
  assert layers["1"]["attention"]["self"]["value"]["c3a_kernel"].shape == (8, 8, 4)
  assert layers["0"]["attention"]["self"]["value"]["c3a_kernel"].shape == (4, 4, 8)
  assert layers["1"]["attention"]["self"]["query"]["c3a_kernel"].shape == (4, 4, 8)
  assert adapter["classifier"]["kernel"].shape == (32, 3)  # PyTorch (3, 32), transposed


def test_adapter_logits(fx):
  model, io, adapter, _ = fx
  params = c3a.combine(adapter, model.params)
  _close(_logits(model, params, io, adapter=True), io["logits_adapter"], "adapter")


def test_adapter_logits_jit(fx):
  model, io, adapter, _ = fx

  @jax.jit
  def run(params):
    with c3a.intercept():
      return model(io["input_ids"], attention_mask=io["attention_mask"], params=params).logits

  _close(np.asarray(run(c3a.combine(adapter, model.params))), io["logits_adapter"], "adapter/jit")


def test_merged_logits(fx):
  model, io, adapter, _ = fx
  merged = c3a.merge(c3a.combine(adapter, model.params))
  _close(_logits(model, merged, io, adapter=False), io["logits_merged"], "merged")


def test_resave_matches_peft_file(fx, tmp_path):
  # save_adapter writes PEFT's own keys, shapes and values back (classifier re-transposed).
  model, _, adapter, cfg = fx
  c3a.save_adapter(str(tmp_path), c3a.combine(adapter, model.params), cfg)
  ours = safetensors.numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
  peft_ = safetensors.numpy.load_file(os.path.join(FIXTURE, "adapter", "adapter_model.safetensors"))
  assert sorted(ours) == sorted(peft_)
  for key, value in peft_.items():
    np.testing.assert_array_equal(ours[key], value, err_msg=key)
  with open(tmp_path / "adapter_config.json") as f:
    ours_cfg = json.load(f)
  with open(os.path.join(FIXTURE, "adapter", "adapter_config.json")) as f:
    peft_cfg = json.load(f)
  for field in (
    "peft_type",
    "block_size",
    "block_size_pattern",
    "init_weights",
    "bias",
    "task_type",
    "layers_to_transform",
    "layers_pattern",
  ):
    assert ours_cfg[field] == peft_cfg[field], field
  assert set(ours_cfg["target_modules"]) == set(peft_cfg["target_modules"])
  assert set(ours_cfg["modules_to_save"]) == set(peft_cfg["modules_to_save"])
