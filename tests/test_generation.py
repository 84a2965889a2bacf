"""Generation with mixed adapters: each row of a batch decodes with its own adapter, and its
tokens equal those of that adapter run alone (or the base model's, for index -1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import c3a_jax as c3a

pytestmark = pytest.mark.integration

PROMPT = np.array([[5, 9, 2, 7], [5, 9, 2, 7], [11, 3, 3, 8], [1, 2, 3, 4]])
INDEX = jnp.array([0, 1, -1, 1])


def _loud(adapter):
  # Large deltas, so that the adapters' greedy tokens differ and the test can tell them apart.
  return jax.tree.map(lambda w: w * 200.0, adapter)


def test_hugging_face_flax_generate_with_a_row_per_adapter():
  transformers = pytest.importorskip("transformers")
  config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
  model = transformers.FlaxGPT2LMHeadModel(config, seed=0)
  cfg = c3a.C3AConfig(block_size=8, target_modules=["c_attn", "c_proj"], init_weights="gaussian")
  adapters = [
    _loud(c3a.split(c3a.attach(model.params, cfg, jax.random.key(i), model_type="gpt2"))[0])
    for i in (1, 2)
  ]

  def generate(params, index=None):
    with c3a.intercept(adapter_index=index):
      out = model.generate(
        jnp.asarray(PROMPT), params=params, max_new_tokens=6, do_sample=False, pad_token_id=0
      )
    return np.asarray(out.sequences)

  alone = [generate(c3a.combine(a, model.params)) for a in adapters]
  base = generate(model.params)
  assert (alone[0] != alone[1]).any() and (alone[0] != base).any()
  mixed = generate(
    c3a.combine(c3a.stack_adapters({"a": adapters[0], "b": adapters[1]}), model.params), INDEX
  )
  for r, k in enumerate(INDEX.tolist()):
    np.testing.assert_array_equal(mixed[r], (base if k < 0 else alone[k])[r])


def test_tunix_nnx_greedy_decoding_with_a_row_per_adapter():
  pytest.importorskip("tunix.models.qwen3.model")
  from flax import nnx
  from tunix.models.qwen3 import model as qwen3

  cfg = qwen3.ModelConfig(
    num_layers=2, vocab_size=64, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8,
    num_kv_heads=2, rope_theta=1_000_000, norm_eps=1e-6,
  )  # fmt: skip
  base = qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))
  c3a_cfg = c3a.C3AConfig(
    block_size=8, target_modules=["q_proj", "v_proj", "down_proj"], init_weights="gaussian"
  )
  models = []
  for i in (1, 2):
    adapted = c3a.attach(base, c3a_cfg, jax.random.key(i))
    for _, p in nnx.iter_graph(adapted):
      if isinstance(p, c3a.C3AParam):
        p[...] = p[...] * 200.0
    models.append(adapted)
  mixed_model = c3a.stack_adapters({"a": models[0], "b": models[1]})

  @nnx.jit
  def next_token(model, tokens, index):
    t = tokens.shape[1]
    positions = jnp.broadcast_to(jnp.arange(t), tokens.shape)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (tokens.shape[0], t, t))
    with c3a.intercept(adapter_index=index):
      logits = model(tokens, positions, None, mask)[0]
    return jnp.argmax(logits[:, -1], axis=-1)

  def greedy(model, index=None):
    tokens = jnp.asarray(PROMPT)
    for _ in range(6):
      tokens = jnp.concatenate([tokens, next_token(model, tokens, index)[:, None]], axis=1)
    return np.asarray(tokens)

  alone = [greedy(m) for m in models]
  plain = greedy(base)
  assert (alone[0] != alone[1]).any() and (alone[0] != plain).any()
  mixed = greedy(mixed_model, INDEX)
  for r, k in enumerate(INDEX.tolist()):
    np.testing.assert_array_equal(mixed[r], (plain if k < 0 else alone[k])[r])
