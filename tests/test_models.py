"""C3A on whole models: tiny Hugging Face Flax models and plain linen MLPs.

What these tests show:

* Under the interceptor, the adapted model equals the merged model (a plain Flax model whose
  kernels hold ``K + delta``), eagerly and under ``jit``, for FlaxBert, FlaxRoberta, FlaxLlama,
  FlaxGPT2 (Conv1D kernels stored ``(out, in)``), FlaxViT and plain linen MLPs (also with
  ``nn.remat`` and ``nn.scan``). The merged reference is built twice: by ``c3a.merge`` and by an
  independent numpy construction of the block-circulant delta straight from its definition
  (``tests/reference.py``), so a layout bug shared by the interceptor and ``merge`` still shows.
* Without the interceptor, a tree holding C3A kernels runs exactly the base model.
* The adapter changes the outputs by far more than the tolerance, so the equalities above are
  not vacuous.
* Training: gradients reach every leaf ``c3a.optimizer`` trains and agree with the gradient of
  the merged model; a few optimizer steps change exactly the non-frozen leaves, leave frozen
  leaves bit-identical, and keep no moment buffers for frozen leaves; the ``split``/``combine``
  pattern gives the same gradient as the one-tree gradient restricted to the trainable leaves.

Tolerance: everything is float32; outputs are compared with ``atol = 1e-5 * max|reference|``
(``rtol = 0``); the FFT path and the dense merged matmul differ by rounding only (observed
errors are ~1e-7 relative).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import c3a_jax as c3a
from tests import tiny
from tests.reference import dense_reference

RTOL_SCALE = 1e-5  # atol = RTOL_SCALE * max|reference|


# --------------------------------------------------------------------------------------------
# Independent references.
# --------------------------------------------------------------------------------------------


def ref_merge(params: Any) -> dict:
  """Folds every C3A kernel into its layer's kernel with :func:`ref_delta_out_in` (numpy)."""
  if not hasattr(params, "items"):
    return params
  out = {}
  for k, v in params.items():
    if k in ("c3a_kernel", "c3a_kernel_out_in"):
      continue
    out[k] = ref_merge(v) if hasattr(v, "items") else v
  kernel = out.get("kernel")
  if "c3a_kernel" in params:  # Flax layout (in, out)
    delta = dense_reference(params["c3a_kernel"]).T
  elif "c3a_kernel_out_in" in params:  # FlaxConv1D layout (out, in)
    delta = dense_reference(params["c3a_kernel_out_in"])
  else:
    return out
  assert kernel.shape == delta.shape, (kernel.shape, delta.shape)
  out["kernel"] = jnp.asarray(np.asarray(kernel, np.float64) + delta, kernel.dtype)
  return out


def flat(tree: Any) -> dict[str, Any]:
  """``{"a.b.leaf": value}`` for a nested dict of leaves."""
  out = {}

  def walk(node, prefix):
    for k, v in node.items():
      if hasattr(v, "items"):
        walk(v, f"{prefix}{k}.")
      else:
        out[f"{prefix}{k}"] = v

  walk(tree, "")
  return out


def assert_close(actual, reference, what: str) -> None:
  actual, reference = np.asarray(actual), np.asarray(reference)
  assert actual.shape == reference.shape, what
  atol = RTOL_SCALE * float(np.abs(reference).max())
  np.testing.assert_allclose(actual, reference, rtol=0, atol=atol, err_msg=what)


def assert_changes(adapted, base, what: str) -> None:
  """The adapter moves the output by far more than the comparison tolerance."""
  adapted, base = np.asarray(adapted), np.asarray(base)
  diff = float(np.abs(adapted - base).max())
  assert diff > 1e3 * RTOL_SCALE * float(np.abs(base).max()), (what, diff)


# --------------------------------------------------------------------------------------------
# Models.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
  """A model with base and adapted params and a way to run it, built once per test session."""

  name: str
  run: Callable[[Any, Any], jax.Array]  # (params, inputs) -> output, no interceptor
  inputs: Any
  base: dict
  adapted: dict
  targets: list[str]  # module paths that got a C3A kernel
  _fns: dict = dataclasses.field(default_factory=dict)

  def fn(self, *, under_c3a: bool, jit: bool) -> Callable:
    """The (cached) forward function: plain or under the interceptor, eager or jitted."""
    key = (under_c3a, jit)
    if key not in self._fns:
      f = self.run
      if under_c3a:
        f = c3a.intercepted(f)  # interceptor inside what is jitted
      self._fns[key] = jax.jit(f) if jit else f
    return self._fns[key]


def _tokens(vocab: int, shape=(2, 7), low: int = 3) -> jax.Array:
  return jax.random.randint(jax.random.key(42), shape, low, vocab)


def _random_params(model, seed: int = 0) -> dict:
  """Params for a Hugging Face Flax model built with ``_do_init=False``, drawn with numpy.

  Only the shapes come from the model (``jax.eval_shape``, no compilation); eager Flax init of
  each model would cost seconds. Norm scales near 1, everything else N(0, 0.1): larger than HF's
  0.02 so that the attention branches, and with them the adapters, move the logits visibly.
  """
  shapes = jax.eval_shape(lambda r: model.init_weights(r, model.input_shape), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = path[-1].key
    norm = name in ("scale", "weight")  # LayerNorm scale, Llama RMSNorm weight
    v = (1.0 if norm else 0.0) + 0.1 * rng.standard_normal(s.shape)
    return jnp.asarray(v, s.dtype)

  return c3a._tree.to_dict(jax.tree_util.tree_map_with_path(draw, shapes))


def _hf_case(name, model, cfg, inputs) -> Case:
  base = _random_params(model)
  model_type = model.config.model_type
  adapted = c3a.attach(base, cfg, jax.random.key(1), model_type=model_type)
  targets = [t.path for t in c3a.select(base, cfg, model_type=model_type)]

  def run(params, x):
    return model(x, params=params).logits

  return Case(name, run, inputs, base, adapted, targets)


def _bert() -> Case:
  from transformers import BertConfig, FlaxBertForSequenceClassification

  model = FlaxBertForSequenceClassification(
    BertConfig(**tiny.BERT),
    _do_init=False,
  )
  # Default targets for "bert" (query, value), with two block sizes.
  cfg = c3a.C3AConfig(
    block_size=8, block_size_pattern={"value": 16}, target_modules=None, init_weights="gaussian"
  )
  return _hf_case("bert", model, cfg, _tokens(64))


def _roberta() -> Case:
  from transformers import FlaxRobertaForSequenceClassification, RobertaConfig

  # Position ids start at padding_idx + 1 = 2: max_position_embeddings must exceed seq_len + 1.
  model = FlaxRobertaForSequenceClassification(
    RobertaConfig(
      vocab_size=64,
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=64,
      max_position_embeddings=40,
      num_labels=3,
    ),
    _do_init=False,
  )
  cfg = c3a.C3AConfig(
    block_size=8,
    block_size_pattern={"intermediate.dense": 16},
    target_modules="all-linear",
    init_weights="gaussian",
  )
  return _hf_case("roberta", model, cfg, _tokens(64))


def _llama() -> Case:
  from transformers import FlaxLlamaForCausalLM, LlamaConfig

  model = FlaxLlamaForCausalLM(
    LlamaConfig(**tiny.LLAMA),
    _do_init=False,
  )
  # k_proj/v_proj are (32, 16): non-square; k_proj at b=16 has m=1, n=2.
  cfg = c3a.C3AConfig(
    block_size=8,
    block_size_pattern={"k_proj": 16},
    target_modules="all-linear",
    init_weights="gaussian",
  )
  return _hf_case("llama", model, cfg, _tokens(64))


def _gpt2_model():
  from transformers import FlaxGPT2LMHeadModel, GPT2Config

  return FlaxGPT2LMHeadModel(
    GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4), _do_init=False
  )


def _gpt2() -> Case:
  # FlaxConv1D: c_attn kernel (96, 32) and c_fc (128, 32) are stored (out, in), non-square.
  cfg = c3a.C3AConfig(
    block_size=8,
    block_size_pattern={"c_fc": 16},
    target_modules=["c_attn", "c_proj", "c_fc"],
    init_weights="gaussian",
  )
  return _hf_case("gpt2", _gpt2_model(), cfg, _tokens(64))


def _vit() -> Case:
  from transformers import FlaxViTForImageClassification, ViTConfig

  model = FlaxViTForImageClassification(
    ViTConfig(
      image_size=8,
      patch_size=4,
      num_channels=3,
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=64,
      num_labels=3,
    ),
    _do_init=False,
  )
  cfg = c3a.C3AConfig(block_size=8, target_modules="all-linear", init_weights="gaussian")
  # HF Flax ViT takes pixel_values (batch, channels, H, W) and transposes them itself.
  pixels = jax.random.normal(jax.random.key(7), (2, 3, 8, 8))
  return _hf_case("vit", model, cfg, pixels)


class MLP(nn.Module):
  """Dense layers of different widths (non-square kernels), optionally rematerialised."""

  features: tuple[int, ...] = (48, 24, 16)
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    dense = nn.remat(nn.Dense) if self.remat else nn.Dense
    for i, f in enumerate(self.features):
      x = dense(f, name=f"dense_{i}")(x)
      if i < len(self.features) - 1:
        x = nn.gelu(x)
    return x


def _mlp(remat: bool) -> Case:
  model = MLP(remat=remat)
  x = jax.random.normal(jax.random.key(3), (4, 5, 32))
  base = c3a._tree.to_dict(model.init(jax.random.key(0), x)["params"])
  # (No block_size_pattern: its keys need a "." before them, so top-level "dense_1" can't match.)
  cfg = c3a.C3AConfig(block_size=8, target_modules=".*", init_weights="gaussian")
  adapted = c3a.attach(base, cfg, jax.random.key(1))

  def run(params, x):
    return model.apply({"params": params}, x)

  return Case(
    "mlp_remat" if remat else "mlp", run, x, base, adapted, [t.path for t in c3a.select(base, cfg)]
  )


BUILDERS = {
  "bert": _bert,
  "roberta": _roberta,
  "llama": _llama,
  "gpt2": _gpt2,
  "vit": _vit,
  "mlp": functools.partial(_mlp, False),
  "mlp_remat": functools.partial(_mlp, True),
}
EXPECTED_TARGETS = {
  "bert": r"bert\.encoder\.layer\.\d\.attention\.self\.(query|value)",
  "roberta": r"roberta\.(encoder\.layer\.\d\.(attention\.self\.(query|key|value)|"
  r"attention\.output\.dense|intermediate\.dense|output\.dense)|pooler\.dense)",
  "llama": r"model\.layers\.\d\.(self_attn\.[qkvo]_proj|mlp\.(up|gate|down)_proj)",
  "gpt2": r"transformer\.h\.\d\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)",
  "vit": r"vit\.(encoder\.layer\.\d\.(attention\.attention\.(query|key|value)|"
  r"attention\.output\.dense|intermediate\.dense|output\.dense)|pooler\.dense)",
  "mlp": r"dense_[012]",
  "mlp_remat": r"dense_[012]",
}

# Two layers each: BERT query/value; RoBERTa, ViT q/k/v/out/intermediate/output; Llama q/k/v/o and
# up/gate/down; GPT-2 c_attn/attn.c_proj/c_fc/mlp.c_proj; the MLP's three Dense layers.
EXPECTED_COUNT = {
  "bert": 4,
  "roberta": 12,
  "llama": 14,
  "gpt2": 8,
  "vit": 12,
  "mlp": 3,
  "mlp_remat": 3,
}


HF_MODELS = ("bert", "roberta", "llama", "gpt2", "vit")


@functools.cache
def get_case(name: str) -> Case:
  if name in HF_MODELS:
    pytest.importorskip("transformers")  # the [hf] extra; the linen MLPs run without it
  return BUILDERS[name]()


@functools.cache
def outputs(name: str, jit: bool) -> dict[str, np.ndarray]:
  """Every output the equality tests compare, computed once per (model, jit)."""
  case = get_case(name)
  plain = case.fn(under_c3a=False, jit=jit)
  wrapped = case.fn(under_c3a=True, jit=jit)
  out = {
    "base": np.asarray(plain(case.base, case.inputs)),
    "unwrapped": np.asarray(plain(case.adapted, case.inputs)),
    "c3a": np.asarray(wrapped(case.adapted, case.inputs)),
    "ref_merged": np.asarray(plain(ref_merge(case.adapted), case.inputs)),
  }
  if not jit:  # (eager only, to spare a compilation per model)
    # The interceptor on a tree with no C3A kernels is the base model.
    out["c3a_on_base"] = np.asarray(wrapped(case.base, case.inputs))
  return out


MODELS = list(BUILDERS)
# Eagerly too in the integration tier.
JIT = pytest.mark.parametrize(
  "jit", [pytest.param(False, marks=pytest.mark.integration), True], ids=["eager", "jit"]
)


# --------------------------------------------------------------------------------------------
# Forward equalities.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_attach_selects_expected_layers(name):
  case = get_case(name)
  assert len(case.targets) == EXPECTED_COUNT[name], case.targets
  for path in case.targets:
    assert re.fullmatch(EXPECTED_TARGETS[name], path), path
  adapted = flat(case.adapted)
  c3a_leaves = [k for k in adapted if k.endswith((".c3a_kernel", ".c3a_kernel_out_in"))]
  assert sorted(k.rsplit(".", 1)[0] for k in c3a_leaves) == sorted(case.targets)
  # attach adds leaves only: every base leaf is still there, untouched.
  for k, v in flat(case.base).items():
    np.testing.assert_array_equal(adapted[k], v, err_msg=k)


# The default tier runs one encoder of each family, GPT-2's Conv1D and the MLPs; all in integration.
@pytest.mark.parametrize(
  "name",
  [pytest.param(n, marks=[pytest.mark.integration] * (n in ("vit", "llama"))) for n in MODELS],
)
@JIT
def test_adapted_equals_merged(name, jit):
  out = outputs(name, jit)
  assert_changes(out["c3a"], out["base"], name)
  assert_close(out["c3a"], out["ref_merged"], f"{name}: interceptor vs merged model")


@pytest.mark.parametrize("name", MODELS)
def test_merge_equals_reference_merge(name):
  """c3a.merge folds each delta into its kernel in the kernel's own layout, as the reference."""
  case = get_case(name)
  merged, ref = flat(c3a.merge(case.adapted)), flat(ref_merge(case.adapted))
  assert sorted(merged) == sorted(ref) == sorted(flat(case.base))  # C3A leaves dropped
  for k, v in ref.items():
    assert merged[k].dtype == v.dtype, k
    assert_close(merged[k], v, f"{name}: c3a.merge vs reference, {k}")


@pytest.mark.parametrize("name", MODELS)
@JIT
def test_unwrapped_equals_base(name, jit):
  out = outputs(name, jit)
  # Flax ignores the extra leaves: the same computation, so bit-identical.
  np.testing.assert_array_equal(out["unwrapped"], out["base"])
  if "c3a_on_base" in out:
    np.testing.assert_array_equal(out["c3a_on_base"], out["base"])


@pytest.mark.integration
@pytest.mark.parametrize("name", MODELS)
def test_jit_matches_eager(name):
  eager, jitted = outputs(name, False), outputs(name, True)
  for key in ("base", "c3a"):
    assert_close(jitted[key], eager[key], f"{name}: {key} jit vs eager")


def test_gpt2_conv1d_gets_out_in_kernels():
  case = get_case("gpt2")
  leaves = flat(case.adapted)
  assert not any(k.endswith(".c3a_kernel") for k in leaves)
  # (out, in) kernels: c_attn (96, 32) -> (96/8, 32/8, 8); c_fc (128, 32) at b=16 -> (8, 2, 16).
  assert leaves["transformer.h.0.attn.c_attn.c3a_kernel_out_in"].shape == (12, 4, 8)
  assert leaves["transformer.h.0.mlp.c_fc.c3a_kernel_out_in"].shape == (8, 2, 16)
  assert leaves["transformer.h.1.mlp.c_proj.c3a_kernel_out_in"].shape == (4, 16, 8)


@pytest.mark.integration  # (the default tier checks its values: test_adapted_equals_merged)
def test_gpt2_conv1d_folds_under_auto(monkeypatch):
  """GPT-2's Conv1D takes the fold under "auto" (its (out, in) kernel transposed, the bias
  added), with the logits and every gradient of the additive path."""
  case = get_case("gpt2")
  calls = []
  real = c3a.ops.fold
  monkeypatch.setattr(c3a.ops, "fold", lambda *a, **k: calls.append(1) or real(*a, **k))
  loss = lambda p, s: jnp.sum(jnp.sin(c3a.intercepted(case.run, strategy=s)(p, case.inputs)))
  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  got = grad(case.adapted, "auto")
  assert len(calls) == len(case.targets)
  calls.clear()
  want = grad(case.adapted, "fft")
  assert not calls
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_gpt2_without_model_type_is_a_clear_error():
  """Attached without model_type, Conv1D kernels get the (in, out) leaf; the interceptor refuses."""
  case = get_case("gpt2")
  cfg = c3a.C3AConfig(block_size=8, target_modules=["c_attn"], init_weights="gaussian")
  wrong = c3a.attach(case.base, cfg, jax.random.key(1))  # no model_type
  assert wrong["transformer"]["h"]["0"]["attn"]["c_attn"]["c3a_kernel"].shape == (4, 12, 8)
  with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn.*model_type"):
    c3a.intercepted(case.run)(wrong, case.inputs)
  with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn.*model_type"):
    jax.jit(c3a.intercepted(case.run))(wrong, case.inputs)


# --------------------------------------------------------------------------------------------
# nn.scan over layers: params (and C3A kernels) stacked along a leading layer axis.
# --------------------------------------------------------------------------------------------


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.gelu(nn.Dense(32, name="dense")(x)), None


class ScanMLP(nn.Module):
  layers: int = 3
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    block = nn.remat(_Block) if self.remat else _Block
    x, _ = nn.scan(
      block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers
    )(name="layers")(x, None)
    return nn.Dense(16, name="out")(x)


@pytest.mark.parametrize(
  "remat,jit",
  [
    # Stacks are in the default tier through tests/test_layers.py's scanned twin.
    pytest.param(False, True, marks=pytest.mark.integration),
    pytest.param(False, False, marks=pytest.mark.integration),
    pytest.param(True, True, marks=pytest.mark.integration),
  ],
  ids=["scan-jit", "scan-eager", "scan_remat-jit"],
)
def test_scan_over_layers(remat, jit):
  """The interceptor sees each scanned layer's slice of a stacked C3A kernel.

  ``c3a.attach`` does not handle stacked (3-D) kernels (it reports the scanned layer as "not a
  Dense layer"), so the stacked C3A kernel is built by hand here: one (m, n, b) kernel per layer.
  """
  model = ScanMLP(remat=remat)
  x = jax.random.normal(jax.random.key(3), (4, 32))
  base = c3a._tree.to_dict(model.init(jax.random.key(0), x)["params"])
  assert base["layers"]["dense"]["kernel"].shape == (3, 32, 32)
  w = jax.random.normal(jax.random.key(5), (3, 4, 4, 8))  # (layers, m, n, b)
  adapted = jax.tree_util.tree_map(lambda v: v, base)
  adapted["layers"]["dense"]["c3a_kernel"] = w
  adapted["out"]["c3a_kernel"] = jax.random.normal(jax.random.key(6), (2, 4, 8))

  def run(params, x):
    return model.apply({"params": params}, x)

  def reference(params):  # the same network, unrolled, with merged weights
    h = x
    dense = params["layers"]["dense"]
    for i in range(3):
      kernel = np.asarray(dense["kernel"][i], np.float64) + dense_reference(w[i]).T
      h = nn.gelu(h @ jnp.asarray(kernel, jnp.float32) + dense["bias"][i])
    out = ref_merge(params["out"])
    return h @ out["kernel"] + out["bias"]

  y_base = run(base, x)
  np.testing.assert_array_equal(run(adapted, x), y_base)
  y_c3a = (jax.jit if jit else lambda f: f)(c3a.intercepted(run))(adapted, x)
  assert_changes(y_c3a, y_base, "scan")
  assert_close(y_c3a, reference(adapted), "scan: interceptor vs unrolled merged reference")


# --------------------------------------------------------------------------------------------
# Gradients and optimizer steps.
# --------------------------------------------------------------------------------------------


@functools.cache
def _train_setup():
  case = get_case("bert")  # the tiny FlaxBertForSequenceClassification, 3 labels
  cfg = c3a.C3AConfig(
    block_size=8,
    target_modules=["query", "value"],
    modules_to_save=["classifier"],
    bias="c3a_only",
    init_weights="gaussian",
  )
  params = c3a.attach(case.base, cfg, jax.random.key(1), model_type="bert")
  x = _tokens(64, (4, 7))
  y = jnp.array([0, 1, 2, 1])

  def loss_plain(p):
    return optax.softmax_cross_entropy_with_integer_labels(case.run(p, x), y).mean()

  loss = c3a.intercepted(loss_plain)
  grad = jax.jit(jax.grad(loss))
  return cfg, params, loss, loss_plain, grad


def _trainable_keys(params, cfg) -> list[str]:
  return [k for k, lab in flat(c3a.labels(params, cfg)).items() if lab != "frozen"]


def test_labels_of_seq_cls_model():
  cfg, params, *_ = _train_setup()
  labels = flat(c3a.labels(params, cfg))
  assert set(flat(params)) == set(labels)
  expected = {}
  for i in range(2):
    for mod in ("query", "value"):
      p = f"bert.encoder.layer.{i}.attention.self.{mod}"
      expected[f"{p}.c3a_kernel"] = "c3a"
      expected[f"{p}.bias"] = "bias"  # bias="c3a_only": biases of adapted layers train
  expected["classifier.kernel"] = expected["classifier.bias"] = "modules_to_save"
  assert {k: v for k, v in labels.items() if v != "frozen"} == expected


@pytest.mark.integration
def test_gradients_reach_trainable_leaves_and_match_merged_model():
  cfg, params, _, loss_plain, grad = _train_setup()
  g = flat(grad(params))
  for k in _trainable_keys(params, cfg):
    assert float(jnp.abs(g[k]).max()) > 0, f"no gradient reaches trainable leaf {k}"
  # The gradient through the interceptor equals autodiff through the merged (dense) model.
  adapter, base = c3a.split(params, cfg)
  g_merged = flat(jax.jit(jax.grad(lambda a: loss_plain(c3a.merge(c3a.combine(a, base)))))(adapter))
  assert set(g_merged) == set(_trainable_keys(params, cfg))
  for k, v in g_merged.items():
    assert_close(g[k], v, f"grad of {k}: interceptor vs merged model")


@pytest.mark.integration
def test_split_combine_gradient_equals_one_tree_gradient():
  cfg, params, loss, _, grad = _train_setup()
  adapter, base = c3a.split(params, cfg)
  trainable = _trainable_keys(params, cfg)
  assert sorted(flat(adapter)) == sorted(trainable)
  g_adapter = flat(jax.jit(jax.grad(lambda a, b: loss(c3a.combine(a, b))))(adapter, base))
  g_full = flat(grad(params))
  assert sorted(g_adapter) == sorted(trainable)  # gradient only for what trains
  for k in trainable:
    np.testing.assert_allclose(
      g_adapter[k], g_full[k], rtol=1e-5, atol=1e-6 * float(jnp.abs(g_full[k]).max()), err_msg=k
    )


def test_optimizer_steps_change_exactly_trainable_leaves():
  cfg, params, _, _, grad = _train_setup()
  tx = c3a.optimizer(optax.adamw(1e-2), params, cfg, head_tx=optax.adam(1e-3))
  state = tx.init(params)
  trainable = set(_trainable_keys(params, cfg))
  flat_params = flat(params)

  # No moment buffers for frozen leaves: adamw and adam each keep mu and nu per trained leaf,
  # and only integer step counts besides.
  state_arrays = [a for a in jax.tree_util.tree_leaves(state) if hasattr(a, "shape")]
  buffers = [a for a in state_arrays if a.ndim > 0]
  assert len(buffers) == 2 * len(trainable)
  assert sum(a.size for a in buffers) == 2 * sum(flat_params[k].size for k in trainable)
  assert all(jnp.issubdtype(a.dtype, jnp.integer) for a in state_arrays if a.ndim == 0)

  @jax.jit
  def update(g, state, p):
    updates, state = tx.update(g, state, p)
    return optax.apply_updates(p, updates), state

  new = params
  for _ in range(3):
    new, state = update(grad(new), state, new)
  new_flat = flat(new)
  assert set(new_flat) == set(flat_params)
  for k, before in flat_params.items():
    after = new_flat[k]
    assert after.dtype == before.dtype and after.shape == before.shape, k
    if k in trainable:
      assert not np.array_equal(after, before), f"trainable leaf {k} did not change"
    else:
      # Bit-identical, despite nonzero gradients and adamw's weight decay.
      np.testing.assert_array_equal(after, before, err_msg=f"frozen leaf {k} changed")
