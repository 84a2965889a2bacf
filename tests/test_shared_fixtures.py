"""The adapter PEFT 0.21.2 saved for a tiny RoBERTa gives PyTorch's logits in Flax (../shared)."""

import os

import jax
import numpy as np
import pytest

import c3a_jax as c3a

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def roberta(shared_fixtures):
  root = os.path.join(shared_fixtures, "peft_roberta_seqcls")
  model = transformers.FlaxRobertaForSequenceClassification.from_pretrained(
    os.path.join(root, "base"), from_pt=True
  )
  return root, model, dict(np.load(os.path.join(root, "io.npz")))


def test_base_logits(roberta):
  _, model, io = roberta
  logits = model(io["input_ids"], attention_mask=io["attention_mask"], params=model.params).logits
  np.testing.assert_allclose(logits, io["logits_base"], atol=1e-5)


def test_adapter_and_merged_logits(roberta, maybe_jit):
  root, model, io = roberta
  adapter, cfg = c3a.load_adapter(os.path.join(root, "adapter"), model.params)
  assert cfg.block_size == 16 and cfg.modules_to_save == ("classifier", "score")
  params = c3a.combine(adapter, model.params)

  @maybe_jit
  def adapted(params, ids, mask):
    with c3a.intercept():
      return model(ids, attention_mask=mask, params=params).logits

  ids, mask = io["input_ids"], io["attention_mask"]
  np.testing.assert_allclose(adapted(params, ids, mask), io["logits_adapter"], atol=1e-5)
  merged = c3a.merge(params, safe=True)
  logits = model(ids, attention_mask=mask, params=merged).logits
  np.testing.assert_allclose(logits, io["logits_merged"], atol=1e-5)
  # Without the interceptor, the adapted tree runs the base model (with the loaded head); the
  # C3A part of this adapter moves logits by ~9e-4, far above the 1e-5 tolerance above.
  base_body = model(ids, attention_mask=mask, params=params).logits
  assert np.abs(base_body - io["logits_adapter"]).max() > 2e-4


def test_adapter_round_trips_through_our_writer(roberta, tmp_path):
  root, model, _ = roberta
  adapter, cfg = c3a.load_adapter(os.path.join(root, "adapter"), model.params)
  c3a.save_adapter(str(tmp_path), c3a.combine(adapter, model.params), cfg)
  again, cfg2 = c3a.load_adapter(str(tmp_path), model.params)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, again, adapter)
