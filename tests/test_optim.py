"""c3a.optimizer trains exactly what the config says, with no state for frozen leaves."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import c3a_jax as c3a


def tree():
  ones = lambda *s: jnp.ones(s, jnp.float32)
  params = {
    "enc": {
      "query": {"kernel": ones(8, 8), "bias": ones(8)},
      "key": {"kernel": ones(8, 8), "bias": ones(8)},
      "norm": {"scale": ones(8), "bias": ones(8)},
    },
    "classifier": {
      "dense": {"kernel": ones(8, 8), "bias": ones(8)},
      "out_proj": {"kernel": ones(8, 2), "bias": ones(2)},
    },
  }
  cfg = c3a.C3AConfig(block_size=4, target_modules=["query"], modules_to_save=["classifier"])
  return c3a.attach(params, cfg, jax.random.key(0)), cfg


@pytest.mark.parametrize(
  "bias,trained_biases",
  [("none", set()), ("c3a_only", {"enc.query"}), ("all", {"enc.query", "enc.key", "enc.norm"})],
)
def test_labels(bias, trained_biases):
  params, cfg = tree()
  cfg = cfg.replace(bias=bias)
  flat = _flat(c3a.labels(params, cfg))
  assert flat["enc.query.c3a_kernel"] == "c3a"
  assert {k for k, v in flat.items() if v == "modules_to_save"} == {
    f"classifier.{m}.{n}" for m in ("dense", "out_proj") for n in ("kernel", "bias")
  }
  assert {k[: -len(".bias")] for k, v in flat.items() if v == "bias"} == trained_biases
  assert flat["enc.query.kernel"] == flat["enc.norm.scale"] == "frozen"


def _flat(t, prefix=""):
  out = {}
  for k, v in t.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
  return out


def test_frozen_leaves_get_no_state_no_update_no_decay():
  params, cfg = tree()
  cfg = cfg.replace(bias="c3a_only")
  tx = c3a.optimizer(
    optax.adamw(1e-1, weight_decay=0.5), params, cfg, head_tx=optax.adamw(1e-3, weight_decay=0.5)
  )
  state = tx.init(params)
  n_trainable = sum(v != "frozen" for v in _flat(c3a.labels(params, cfg)).values())
  # Adam keeps two moments per trained leaf and nothing for frozen ones (plus scalar counts).
  moments = [x for x in jax.tree.leaves(state) if np.ndim(x) > 0]
  assert len(moments) == 2 * n_trainable
  grads = jax.tree.map(jnp.ones_like, params)
  new = params
  for _ in range(3):
    updates, state = jax.jit(tx.update)(grads, state, new)
    new = optax.apply_updates(new, updates)
  labels = _flat(c3a.labels(params, cfg))
  old, new = _flat(params), _flat(new)
  for k, lab in labels.items():
    changed = not np.array_equal(old[k], new[k])
    assert changed == (lab != "frozen"), (k, lab)
  # Adam's first steps move each weight by about the learning rate: the head's is 100x smaller.
  step_c3a = np.abs(old["enc.query.bias"] - new["enc.query.bias"]).max()
  step_head = np.abs(old["classifier.dense.bias"] - new["classifier.dense.bias"]).max()
  assert 50 < step_c3a / step_head < 200


def test_optimizer_refuses_a_tree_with_nothing_to_train():
  params = {"fc": {"kernel": jnp.ones((4, 4))}}
  with pytest.raises(ValueError, match="nothing in params is trainable"):
    c3a.optimizer(optax.sgd(1.0), params, c3a.C3AConfig(block_size=2, target_modules=["fc"]))


def test_summary_counts_like_peft():
  params, cfg = tree()
  s = c3a.summary(params, cfg, per_layer=True)
  n_c3a = 2 * 2 * 4
  n_head = 8 * 8 + 8 + 8 * 2 + 2
  total = sum(np.size(x) for x in jax.tree.leaves(params))
  assert (s.trainable, s.total) == (n_c3a + n_head, total)
  assert s.share == pytest.approx((n_c3a + n_head) / total)
  text = str(s)
  assert text.startswith(f"trainable params: {n_c3a + n_head:,} || all params: {total:,}")
  assert "enc.query.c3a_kernel" in text and "(2, 2, 4)" in text and "enc.key" not in text
  assert c3a.summary(params).trainable == n_c3a and not c3a.summary(params).layers


def test_modules_to_save_trains_what_peft_trains():
  # PEFT wraps every module whose name ends with an entry, as a plain string: "norm" takes
  # input_layernorm too, but never makes it a C3A target (that rule wants whole segments).
  ones = jnp.ones((8,))
  params = {
    "model": {
      "layers": {
        "0": {"input_layernorm": {"weight": ones}, "q_proj": {"kernel": jnp.ones((8, 8))}}
      },
      "norm": {"weight": ones},
      "prenorm": {"weight": ones},
    }
  }
  cfg = c3a.C3AConfig(block_size=4, target_modules=["q_proj"], modules_to_save=["norm"])
  flat = _flat(c3a.labels(params, cfg))
  assert (
    flat["model.norm.weight"] == flat["model.layers.0.input_layernorm.weight"] == "modules_to_save"
  )
  assert flat["model.prenorm.weight"] == "modules_to_save"  # "prenorm".endswith("norm")
  assert flat["model.layers.0.q_proj.kernel"] == "frozen"
  seq = c3a.C3AConfig(block_size=4, target_modules=["q_proj"], task_type="SEQ_CLS")
  assert seq.modules_to_save == ("classifier", "score")  # PEFT's SEQ_CLS head, implicit


def test_optimizer_on_frozendict_params():
  import flax

  params, cfg = tree()
  frozen = flax.core.freeze(params)
  tx = c3a.optimizer(optax.adam(1e-1), frozen, cfg)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, frozen), tx.init(frozen), frozen)
  assert isinstance(updates, flax.core.FrozenDict)
  assert not np.asarray(updates["enc"]["query"]["kernel"]).any()
  assert np.asarray(updates["enc"]["query"]["c3a_kernel"]).all()
