"""Live round trips between c3a-jax and Hugging Face PEFT's C3A (PyTorch), both directions.

Runs only where torch and peft import (the [interop] extra). Every number c3a-jax produces is
compared with what PyTorch + PEFT compute for the same weights: logits with the adapter, logits
after merging, merged weights, and the C3A kernel gradient of one layer. PEFT's hand-written
backward is wrong for the *input* gradient when the block size is >= 3, so input gradients are
compared with torch autograd through PEFT's dense delta instead (never with PEFT's backward).

Covered:
  * BERT for sequence classification, classifier in modules_to_save: JAX -> PEFT and PEFT -> JAX.
  * Llama causal LM (grouped KV heads), q/v/gate/down projections, block_size_pattern giving
    down_proj a smaller block size, lm_head in modules_to_save: both directions.
  * An adapter trained a few steps with c3a.optimizer, through PEFT and back.
  * Which layers a config adapts (and their block sizes) equals PEFT's choice.
  * PEFT's corners: trained biases, exclude_modules, a Flax leaf named weight, SEQ_CLS heads.
"""

import copy
import types
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
if not hasattr(peft, "C3AConfig"):
  pytest.skip("this peft has no C3A (needs peft>=0.16)", allow_module_level=True)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import c3a_jax as c3a  # noqa: E402
from tests import tiny  # noqa: E402

pytestmark = [pytest.mark.interop, pytest.mark.integration]

ATOL = 1e-5  # logits; PyTorch and XLA agree on the base models to ~1e-7
BERT = tiny.BERT
LLAMA = dict(tiny.LLAMA, tie_word_embeddings=False)
LLAMA_C3A = dict(
  block_size=16,
  block_size_pattern={"down_proj": 8},
  target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
)


# ----------------------------------------------------------------------------------------------
# helpers


def _close(got, want, what, atol=ATOL):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
  diff = float(np.abs(got - want).max())
  print(f"[interop] {what}: max abs diff {diff:.3g}")
  assert diff <= atol, f"{what}: max |c3a-jax - PEFT| = {diff:.3g} > {atol}"


def _differs(a, b, what, by=100 * ATOL):
  # The adapter must move the logits far beyond the tolerance, or a comparison proves nothing.
  diff = float(np.abs(np.asarray(a) - np.asarray(b)).max())
  assert diff > by, f"{what}: the adapter barely changes the logits ({diff:.3g}); test is vacuous"


def _torch_logits(model, m):
  with torch.no_grad():
    return model(
      input_ids=torch.as_tensor(m.ids), attention_mask=torch.as_tensor(m.mask)
    ).logits.numpy()


def _jax_logits(m, params, *, adapter=True):
  if adapter:
    with c3a.intercept():
      return np.asarray(m.flax(m.ids, attention_mask=m.mask, params=params).logits)
  return np.asarray(m.flax(m.ids, attention_mask=m.mask, params=params).logits)


def _peft_load(m, directory):
  """PeftModel.from_pretrained on a fresh torch base; fails on missing/unexpected adapter keys."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pm = peft.PeftModel.from_pretrained(m.torch_base(), directory).eval()
  bad = [
    str(w.message)
    for w in caught
    if "missing adapter keys" in str(w.message).lower()
    or ("unexpected" in str(w.message).lower() and "adapter" in str(w.message).lower())
  ]
  assert not bad, f"PEFT did not load the adapter cleanly: {bad}"
  return pm


def _c3a_layers(pm):
  """{module path: C3ALinear} of a PEFT model, paths as in the base model (= Flax paths)."""
  return {
    name: mod
    for name, mod in pm.base_model.model.named_modules()
    if isinstance(mod, peft.tuners.c3a.C3ALinear)
  }


def _perturb(params, key, paths, scale):
  """Adds scale * N(0, 1) to every leaf under the given module paths (a modified head)."""
  out = jax.tree_util.tree_map(lambda x: x, params)
  for i, path in enumerate(paths):
    node = out
    for seg in path.split("."):
      node = node[seg]
    for j, name in enumerate(sorted(node)):
      k = jax.random.fold_in(jax.random.fold_in(key, i), j)
      node[name] = node[name] + scale * jax.random.normal(k, node[name].shape, node[name].dtype)
  return out


def _scale_kernels(params, factor):
  """Multiplies every c3a_kernel by ``factor`` (xavier init is small; make the adapter matter)."""
  adapter, base = c3a.split(params)
  return c3a.combine(jax.tree_util.tree_map(lambda w: w * factor, adapter), base)


def _peft_perturb(module, scale):
  with torch.no_grad():
    for p in module.parameters():
      p.add_(scale * torch.randn_like(p))


def _check_merge(pm, params, m, what):
  """PEFT's merge and c3a.merge agree on every merged weight and on the logits."""
  pm.merge_adapter()
  merged = c3a.merge(params)
  _check_merged_weights(pm, merged)
  _close(_jax_logits(m, merged, adapter=False), _torch_logits(pm, m), f"{what} merged logits")


def _check_merged_weights(pm, merged_params):
  """PEFT's merged Linear weights equal c3a.merge's kernels (transposed)."""
  for path, layer in _c3a_layers(pm).items():
    node = merged_params
    for seg in path.split("."):
      node = node[seg]
    assert "c3a_kernel" not in node
    _close(
      np.asarray(node["kernel"]).T,
      layer.get_base_layer().weight.detach().numpy(),
      f"merged weight {path}",
      atol=1e-6,
    )


# ----------------------------------------------------------------------------------------------
# models: one tiny PyTorch model per family, saved once, converted to Flax by transformers


def _make(tmp_path_factory, name, torch_cls, torch_cfg, flax_cls, seed):
  torch.manual_seed(seed)
  d = str(tmp_path_factory.mktemp(name))
  torch_cls(torch_cfg).eval().save_pretrained(d, safe_serialization=True)
  rs = np.random.RandomState(seed)
  ids = rs.randint(1, torch_cfg.vocab_size, (3, 10)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  return types.SimpleNamespace(
    dir=d,
    ids=ids,
    mask=mask,
    flax=flax_cls.from_pretrained(d, from_pt=True),
    torch_base=lambda: torch_cls.from_pretrained(d).eval(),
  )


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
  return _make(
    tmp_path_factory,
    "bert",
    transformers.BertForSequenceClassification,
    transformers.BertConfig(**BERT),
    transformers.FlaxBertForSequenceClassification,
    0,
  )


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  m = _make(
    tmp_path_factory,
    "llama",
    transformers.LlamaForCausalLM,
    transformers.LlamaConfig(**LLAMA),
    transformers.FlaxLlamaForCausalLM,
    1,
  )
  m.mask = np.ones_like(m.ids)  # causal LM: no padding, keep positions identical on both sides
  return m


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_base_models_agree(family, request):
  m = request.getfixturevalue(family)
  _close(
    _jax_logits(m, m.flax.params, adapter=False), _torch_logits(m.torch_base(), m), f"{family} base"
  )


# ----------------------------------------------------------------------------------------------
# BERT, sequence classification


def test_bert_jax_to_peft(bert, tmp_path):
  cfg = c3a.C3AConfig(
    block_size=8,
    block_size_pattern={"intermediate.dense": 16},
    target_modules=["query", "value", "intermediate.dense"],
    modules_to_save=["classifier"],
    init_weights="xavier_uniform",
    task_type="SEQ_CLS",
  )
  params = c3a.attach(bert.flax.params, cfg, jax.random.key(0))
  params = _scale_kernels(params, 30.0)
  params = _perturb(params, jax.random.key(1), ["classifier"], 0.2)
  ours = _jax_logits(bert, params)
  base = _jax_logits(bert, bert.flax.params, adapter=False)
  _differs(ours, base, "bert jax->peft")
  # the C3A kernels alone (without the new head) matter as well
  _differs(
    _jax_logits(bert, c3a.combine(c3a.split(params)[0], bert.flax.params)),
    base,
    "bert jax->peft, kernels only",
  )

  c3a.save_adapter(str(tmp_path), params, cfg)
  pm = _peft_load(bert, str(tmp_path))
  layers = _c3a_layers(pm)
  assert sorted(layers) == sorted(t.path for t in c3a.select(bert.flax.params, cfg))
  for path, layer in layers.items():
    node = params
    for seg in path.split("."):
      node = node[seg]
    assert layer.block_size["default"] == (16 if path.endswith("intermediate.dense") else 8)
    np.testing.assert_array_equal(
      layer.c3a_kernel["default"].detach().numpy(), np.asarray(node["c3a_kernel"]), err_msg=path
    )
  _close(ours, _torch_logits(pm, bert), "bert jax->peft adapter logits")

  _check_merge(pm, params, bert, "bert jax->peft")


def test_bert_peft_to_jax(bert, tmp_path):
  torch.manual_seed(2)
  pcfg = peft.C3AConfig(
    block_size=8,
    block_size_pattern={"value": 4, "output.dense": 16},
    target_modules=["query", "key", "value", "output.dense"],
    init_weights="gaussian",
    modules_to_save=["classifier"],
    task_type="SEQ_CLS",
  )
  pm = peft.get_peft_model(bert.torch_base(), pcfg).eval()
  _peft_perturb(pm.base_model.model.classifier.modules_to_save["default"], 0.2)
  want = _torch_logits(pm, bert)
  _differs(want, _jax_logits(bert, bert.flax.params, adapter=False), "bert peft->jax")
  pm.save_pretrained(str(tmp_path), safe_serialization=True)

  adapter, cfg = c3a.load_adapter(str(tmp_path), bert.flax.params)
  assert cfg.block_size_pattern == {"value": 4, "output.dense": 16}
  assert "classifier" in cfg.modules_to_save
  for path, layer in _c3a_layers(pm).items():  # every PEFT kernel arrived, unchanged
    node = adapter
    for seg in path.split("."):
      node = node[seg]
    np.testing.assert_array_equal(
      np.asarray(node["c3a_kernel"]), layer.c3a_kernel["default"].detach().numpy(), err_msg=path
    )
  params = c3a.combine(adapter, bert.flax.params)
  _close(_jax_logits(bert, params), want, "bert peft->jax adapter logits")
  _close(
    np.asarray(
      jax.jit(
        c3a.intercepted(lambda p: bert.flax(bert.ids, attention_mask=bert.mask, params=p).logits)
      )(params)
    ),
    want,
    "bert peft->jax adapter logits (jit)",
  )

  _check_merge(pm, params, bert, "bert peft->jax")


# ----------------------------------------------------------------------------------------------
# Llama, causal LM


def test_llama_jax_to_peft(llama, tmp_path):
  cfg = c3a.C3AConfig(
    **LLAMA_C3A, modules_to_save=["lm_head"], init_weights="gaussian", task_type="CAUSAL_LM"
  )
  params = c3a.attach(llama.flax.params, cfg, jax.random.key(3))
  assert params["model"]["layers"]["1"]["mlp"]["down_proj"]["c3a_kernel"].shape == (4, 8, 8)
  assert params["model"]["layers"]["1"]["self_attn"]["v_proj"]["c3a_kernel"].shape == (1, 2, 16)
  params = _perturb(params, jax.random.key(4), ["lm_head"], 0.05)
  ours = _jax_logits(llama, params)
  _differs(ours, _jax_logits(llama, llama.flax.params, adapter=False), "llama jax->peft")

  c3a.save_adapter(str(tmp_path), params, cfg)
  pm = _peft_load(llama, str(tmp_path))
  layers = _c3a_layers(pm)
  assert len(layers) == 8
  assert {p: layer.block_size["default"] for p, layer in layers.items()} == {
    t.path: t.block_size for t in c3a.select(llama.flax.params, cfg)
  }
  _close(ours, _torch_logits(pm, llama), "llama jax->peft adapter logits")

  _check_merge(pm, params, llama, "llama jax->peft")


def test_llama_peft_to_jax(llama, tmp_path):
  torch.manual_seed(5)
  pm = peft.get_peft_model(
    llama.torch_base(),
    peft.C3AConfig(**copy.deepcopy(LLAMA_C3A), init_weights="gaussian", task_type="CAUSAL_LM"),
  ).eval()
  want = _torch_logits(pm, llama)
  _differs(want, _jax_logits(llama, llama.flax.params, adapter=False), "llama peft->jax")
  pm.save_pretrained(str(tmp_path), safe_serialization=True)

  adapter, cfg = c3a.load_adapter(str(tmp_path), llama.flax.params)
  assert cfg.block_size == 16 and cfg.block_size_pattern == {"down_proj": 8}
  assert adapter["model"]["layers"]["0"]["mlp"]["down_proj"]["c3a_kernel"].shape == (4, 8, 8)
  params = c3a.combine(adapter, llama.flax.params)
  _close(_jax_logits(llama, params), want, "llama peft->jax adapter logits")

  _check_merge(pm, params, llama, "llama peft->jax")


# ----------------------------------------------------------------------------------------------
# a trained adapter: c3a.optimizer steps, then through PEFT and back


def test_trained_adapter_round_trip(bert, tmp_path):
  cfg = c3a.C3AConfig(
    block_size=8,
    target_modules=["query", "value", "dense"],
    modules_to_save=["classifier"],
    task_type="SEQ_CLS",
  )
  params0 = c3a.attach(bert.flax.params, cfg, jax.random.key(6))
  tx = c3a.optimizer(optax.adam(1e-1), params0, cfg, head_tx=optax.adam(1e-2))
  labels = jnp.asarray(np.random.RandomState(7).randint(0, BERT["num_labels"], len(bert.ids)))

  def loss_fn(p):
    with c3a.intercept():
      logits = bert.flax(bert.ids, attention_mask=bert.mask, params=p).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss

  params, state, losses = params0, tx.init(params0), []
  for _ in range(4):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < losses[0], losses

  # Only the adapter and the head moved; frozen weights are bit-for-bit the base's.
  trained, frozen = c3a.split(params, cfg)
  initial, frozen0 = c3a.split(params0, cfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, frozen, frozen0)
  moved = jax.tree_util.tree_map(
    lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), trained, initial
  )
  assert all(jax.tree_util.tree_leaves(moved)), moved

  ours = _jax_logits(bert, params)
  _differs(ours, _jax_logits(bert, params0), "trained vs initial adapter")

  # JAX -> PEFT
  c3a.save_adapter(str(tmp_path / "jax"), params, cfg)
  pm = _peft_load(bert, str(tmp_path / "jax"))
  _close(ours, _torch_logits(pm, bert), "trained adapter jax->peft logits")

  # ... and PEFT -> JAX again: PEFT's re-saved adapter is the trained one, exactly.
  pm.save_pretrained(str(tmp_path / "peft"), safe_serialization=True)
  again, cfg2 = c3a.load_adapter(str(tmp_path / "peft"), bert.flax.params)
  assert set(cfg2.target_modules) == set(cfg.target_modules)
  assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(trained)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, trained)
  _close(
    _jax_logits(bert, c3a.combine(again, bert.flax.params)),
    ours,
    "trained adapter peft->jax logits",
  )

  pm.merge_adapter()
  _close(
    _jax_logits(bert, c3a.merge(params), adapter=False),
    _torch_logits(pm, bert),
    "trained adapter merged logits",
  )


# ----------------------------------------------------------------------------------------------
# gradients of one adapted layer


@pytest.mark.parametrize("d_in,d_out,b", [(32, 48, 8), (30, 20, 5), (24, 24, 24), (16, 8, 1)])
def test_one_layer_gradients(d_in, d_out, b):
  torch.manual_seed(d_in * 100 + b)

  class One(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.lin = torch.nn.Linear(d_in, d_out)

    def forward(self, x):
      return self.lin(x)

  pm = peft.get_peft_model(
    One(), peft.C3AConfig(block_size=b, target_modules=["lin"], init_weights="gaussian")
  )
  layer = pm.base_model.model.lin
  w_t = layer.c3a_kernel["default"]
  weight = layer.get_base_layer().weight.detach()
  bias = layer.get_base_layer().bias.detach()
  x_t = torch.randn(3, 5, d_in)
  g_t = torch.randn(3, 5, d_out)
  y_t = pm(x_t)
  (y_t * g_t).sum().backward()
  # Input-gradient reference: torch autograd through PEFT's dense delta (PEFT's own backward
  # gets the input gradient wrong for b >= 3, so its x.grad is never used).
  x_ref = x_t.clone().requires_grad_(True)
  with torch.no_grad():
    dense = weight + layer.get_delta_weight("default")
  (torch.nn.functional.linear(x_ref, dense, bias) * g_t).sum().backward()

  dense_layer = nn.Dense(d_out)
  params = {"kernel": jnp.asarray(weight.numpy().T), "bias": jnp.asarray(bias.numpy())}
  x, g = jnp.asarray(x_t.numpy()), jnp.asarray(g_t.numpy())

  def f(w, x):
    y = c3a.intercepted(dense_layer.apply)({"params": {**params, "c3a_kernel": w}}, x)
    return (y * g).sum(), y

  (_, y), (gw, gx) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
    jnp.asarray(w_t.detach().numpy()), x
  )
  scale = float(np.abs(w_t.grad.numpy()).max())
  _close(y, y_t.detach().numpy(), f"one layer {d_in}x{d_out}/b{b} forward")
  _close(
    np.asarray(gw) / scale,
    w_t.grad.numpy() / scale,
    f"one layer {d_in}x{d_out}/b{b} kernel grad (relative)",
  )
  _close(gx, x_ref.grad.numpy(), f"one layer {d_in}x{d_out}/b{b} input grad vs autograd")


# ----------------------------------------------------------------------------------------------
# layer selection: c3a.select adapts exactly the layers (and block sizes) PEFT adapts

SELECTION = [
  ("bert", dict(block_size=8, target_modules=["query", "value"])),
  (
    "bert",
    dict(
      block_size=8,
      target_modules=["dense"],
      block_size_pattern={"intermediate.dense": 16, r"output\.dense": 4},
    ),
  ),
  ("bert", dict(block_size=8, target_modules=r".*layer\.1\..*(query|key)")),
  ("bert", dict(block_size=8, target_modules=["query", "value"], layers_to_transform=1)),
  (
    "bert",
    dict(
      block_size=8,
      target_modules=["query", "value"],
      layers_to_transform=[0],
      layers_pattern="layer",
    ),
  ),
  ("bert", dict(block_size=8, target_modules="all-linear")),
  ("bert", dict(block_size=8, target_modules=["dense"], modules_to_save=["pooler"])),
  ("bert", dict(block_size=8)),
  (
    "llama",
    dict(
      block_size=16,
      target_modules="all-linear",
      block_size_pattern={"down_proj": 8, r"1\.self_attn\.o_proj": 4},
    ),
  ),
  (
    "llama",
    dict(
      block_size=16,
      target_modules=["q_proj", "gate_proj"],
      layers_to_transform=[1],
      layers_pattern="layers",
    ),
  ),
  ("llama", dict(block_size=16)),
]


@pytest.mark.parametrize(
  "family,kw", SELECTION, ids=[f"{f}-{i}" for i, (f, _) in enumerate(SELECTION)]
)
def test_selection_matches_peft(family, kw, request):
  m = request.getfixturevalue(family)
  task = "SEQ_CLS" if family == "bert" else "CAUSAL_LM"
  # PEFT mutates lists in its config (it adds the classifier to modules_to_save): give it a copy.
  pm = peft.get_peft_model(m.torch_base(), peft.C3AConfig(**copy.deepcopy(kw), task_type=task))
  theirs = {p: layer.block_size["default"] for p, layer in _c3a_layers(pm).items()}
  cfg = c3a.C3AConfig(**kw, task_type=task)
  ours = {t.path: t.block_size for t in c3a.select(m.flax.params, cfg, model_type=family)}
  assert ours == theirs


# ----------------------------------------------------------------------------------------------
# PEFT 0.21.2's corners: trained biases (saved as '<layer>.base_layer.bias'), exclude_modules (a
# field PEFT's C3AConfig lacks), a Flax leaf named 'weight', and SEQ_CLS's implicit head.


@pytest.mark.parametrize("bias", ["c3a_only", "all"])
def test_bias_jax_to_peft(bert, tmp_path, bias):
  cfg = c3a.C3AConfig(
    block_size=8,
    target_modules=["query", "value"],
    bias=bias,
    modules_to_save=["classifier"],
    init_weights="gaussian",
    task_type="SEQ_CLS",
  )
  params = c3a.attach(bert.flax.params, cfg, jax.random.key(8))
  adapter, base = c3a.split(params, cfg)
  adapter = jax.tree_util.tree_map_with_path(
    lambda kp, x: x + 0.5 if jax.tree_util.keystr(kp).endswith("['bias']") else x, adapter
  )
  params = c3a.combine(adapter, base)
  ours = _jax_logits(bert, params)
  c3a.save_adapter(str(tmp_path), params, cfg)
  pm = peft.PeftModel.from_pretrained(bert.torch_base(), str(tmp_path)).eval()
  _close(ours, _torch_logits(pm, bert), f"bias={bias} jax->peft logits")


@pytest.mark.parametrize("bias", ["c3a_only", "all"])
def test_bias_peft_to_jax(bert, tmp_path, bias):
  torch.manual_seed(9)
  pm = peft.get_peft_model(
    bert.torch_base(),
    peft.C3AConfig(
      block_size=8,
      target_modules=["query", "value"],
      bias=bias,
      init_weights="gaussian",
      modules_to_save=["classifier"],
      task_type="SEQ_CLS",
    ),
  ).eval()
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if p.requires_grad and name.endswith("bias"):
        p.add_(0.5)
  want = _torch_logits(pm, bert)
  pm.save_pretrained(str(tmp_path), safe_serialization=True)
  adapter, _ = c3a.load_adapter(str(tmp_path), bert.flax.params)
  _close(
    _jax_logits(bert, c3a.combine(adapter, bert.flax.params)), want, f"bias={bias} peft->jax logits"
  )


def test_exclude_modules_jax_to_peft(bert, tmp_path):
  cfg = c3a.C3AConfig(
    block_size=8,
    target_modules=["query", "value"],
    exclude_modules=["value"],
    init_weights="gaussian",
  )
  params = c3a.attach(bert.flax.params, cfg, jax.random.key(10))
  ours = _jax_logits(bert, params)
  c3a.save_adapter(str(tmp_path), params, cfg)
  pm = _peft_load(bert, str(tmp_path))
  assert not any(p.endswith("value") for p in _c3a_layers(pm))
  _close(ours, _torch_logits(pm, bert), "exclude_modules jax->peft logits")


def test_llama_norm_in_modules_to_save_peft_to_jax(llama, tmp_path):
  torch.manual_seed(11)
  pm = peft.get_peft_model(
    llama.torch_base(),
    peft.C3AConfig(
      **copy.deepcopy(LLAMA_C3A), modules_to_save=["model.norm"], task_type="CAUSAL_LM"
    ),
  ).eval()
  _peft_perturb(pm.base_model.model.model.norm.modules_to_save["default"], 0.3)
  want = _torch_logits(pm, llama)
  pm.save_pretrained(str(tmp_path), safe_serialization=True)
  adapter, _ = c3a.load_adapter(str(tmp_path), llama.flax.params)
  _close(
    _jax_logits(llama, c3a.combine(adapter, llama.flax.params)),
    want,
    "llama model.norm peft->jax logits",
  )


def test_seq_cls_without_modules_to_save(bert, tmp_path):
  cfg = c3a.C3AConfig(
    block_size=8, target_modules=["query", "value"], init_weights="gaussian", task_type="SEQ_CLS"
  )
  params = c3a.attach(bert.flax.params, cfg, jax.random.key(12))
  try:
    c3a.save_adapter(str(tmp_path), params, cfg)
  except ValueError:
    return  # refusing, with a message, is an acceptable fix too
  pm = peft.PeftModel.from_pretrained(bert.torch_base(), str(tmp_path)).eval()
  _close(_jax_logits(bert, params), _torch_logits(pm, bert), "SEQ_CLS without head")
