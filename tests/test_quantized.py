"""C3A over a base quantized by Qwix (QC3A): Qwix's products plus C3A's float32 delta.

References: Qwix's own quantized model (the base product, which c3a must leave as it is), the
float64 definition of the delta (tests/reference.py), and the float model over Qwix's own
dequantized weights (qwix.dequantize), which computes what the quantized model should.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import c3a_jax as c3a
from tests.reference import dense_reference

qwix = pytest.importorskip("qwix")

SETTINGS = {
  "int8": {"weights": "int8"},
  "int4": {"weights": "int4"},
  "nf4-tile8": {"weights": "nf4", "tile_size": 8},
}
LINEN = {
  "dense": (lambda: nn.Dense(32), (4, 3, 16), 1),
  "dense_general": (lambda: nn.DenseGeneral((2, 16)), (4, 3, 16), 1),
  "einsum": (lambda: nn.Einsum((16, 32), "bti,io->bto"), (4, 3, 16), 1),
}


def _nonzero(tree, scale=0.05):
  """Every C3A kernel drawn at random: attach's zeros would hide a wrong delta."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  return jax.tree.unflatten(
    treedef,
    [scale * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves, strict=True)],
  )


def _adapted_linen(make, x_shape, settings):
  model = make()
  x = jax.random.normal(jax.random.key(0), x_shape)
  params = model.init(jax.random.key(1), x)["params"]
  qmodel, qparams = c3a.quantize.quantize_linen(model, params, x, **settings)
  cfg = c3a.C3AConfig(block_size=8, target_modules=".*")
  adapted = c3a.attach(
    qparams, cfg, jax.random.key(2), forward=lambda p: qmodel.apply({"params": p}, x)
  )
  adapter, base = c3a.split(adapted)
  return model, qmodel, params, c3a.combine(_nonzero(adapter), base), x, cfg


# Every layer kind and weight type under "auto", every strategy on one of them; the default
# tier runs one case per layer kind and weight type.
DEFAULT = {("dense", "int8"), ("dense_general", "int4"), ("einsum", "nf4-tile8")}
CASES = [
  pytest.param(
    layer,
    setting,
    strategy,
    marks=() if (layer, setting) in DEFAULT and strategy == "auto" else pytest.mark.integration,
  )
  for layer, setting, strategy in [
    *((layer, setting, "auto") for layer in sorted(LINEN) for setting in sorted(SETTINGS)),
    *(("dense_general", "int4", strategy) for strategy in ("fft", "freq_major", "dense")),
  ]
]


@pytest.mark.parametrize(("layer", "setting", "strategy"), CASES)
def test_linen_output_is_qwix_product_plus_the_reference_delta(layer, setting, strategy):
  make, x_shape, _ = LINEN[layer]
  _, qmodel, _, adapted, x, _ = _adapted_linen(make, x_shape, SETTINGS[setting])
  got = jax.jit(c3a.intercepted(qmodel.apply, strategy=strategy))({"params": adapted}, x)
  base = dict(adapted)
  w = base.pop("c3a_kernel")
  qwix_own = qmodel.apply({"params": base}, x)  # Qwix's product, no C3A anywhere
  delta = np.asarray(x, np.float64).reshape(-1, 16) @ dense_reference(w).T
  want = np.asarray(qwix_own, np.float64) + delta.reshape(qwix_own.shape)
  np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
  assert np.abs(delta).max() > 1e-3  # the adapter is visible at this tolerance


@pytest.mark.integration
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_linen_error_to_the_full_precision_model_is_the_quantization_error(setting):
  make, x_shape, _ = LINEN["dense"]
  model, qmodel, params, adapted, x, _ = _adapted_linen(make, x_shape, SETTINGS[setting])
  w = adapted["c3a_kernel"]
  quantization_error = float(
    jnp.abs(qmodel.apply({"params": adapted}, x) - model.apply({"params": params}, x)).max()
  )
  full = c3a.intercepted(model.apply, strategy="fft")({"params": {**params, "c3a_kernel": w}}, x)
  got = c3a.intercepted(qmodel.apply)({"params": adapted}, x)
  assert 0 < float(jnp.abs(got - full).max()) <= quantization_error + 1e-5


@pytest.mark.integration
def test_linen_gradients_reach_the_c3a_kernels_alone_and_match_the_dequantized_model():
  make, x_shape, _ = LINEN["dense_general"]
  model, qmodel, _, adapted, x, cfg = _adapted_linen(make, x_shape, SETTINGS["int4"])
  adapter, base = c3a.split(adapted)
  float_base = c3a.quantize.dequantize(base)

  def loss(adapter, base, apply):
    return jnp.sum(c3a.intercepted(apply)({"params": c3a.combine(adapter, base)}, x) ** 2)

  got = jax.jit(jax.grad(loss), static_argnums=2)(adapter, base, qmodel.apply)
  want = jax.grad(loss)(adapter, float_base, model.apply)
  np.testing.assert_allclose(got["c3a_kernel"], want["c3a_kernel"], rtol=1e-4, atol=1e-6)

  tx = c3a.optimizer(optax.adam(1e-2), adapted, cfg)
  labels = c3a.labels(adapted, cfg)
  assert labels["kernel"] == "frozen" and labels["c3a_kernel"] == "c3a"
  state = c3a.TrainState.create(adapter, tx)
  step = jax.jit(
    c3a.make_train_step(lambda p, b, r: jnp.sum(qmodel.apply({"params": p}, b) ** 2), tx)
  )
  new, _ = step(state, base, x)
  assert not np.allclose(new.params["c3a_kernel"], adapter["c3a_kernel"])


@pytest.mark.integration
def test_scanned_layers_quantize_per_layer_and_match_the_dequantized_model():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.tanh(nn.Dense(16, name="fc")(x)), None

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
      return scan(name="layers")(x, None)[0]

  model = Stack()
  x = jax.random.normal(jax.random.key(0), (4, 16))
  params = model.init(jax.random.key(1), x)["params"]
  qmodel, qparams = c3a.quantize.quantize_linen(model, params, x, weights="int8")
  assert qparams["layers"]["fc"]["kernel"].array.scale.shape == (3, 1, 16)  # a scale per layer
  cfg = c3a.C3AConfig(block_size=4, target_modules=["fc"])
  fwd = lambda p: qmodel.apply({"params": p}, x)
  adapter, base = c3a.split(c3a.attach(qparams, cfg, jax.random.key(2), forward=fwd))
  assert adapter["layers"]["fc"]["c3a_kernel"].shape == (3, 4, 4, 4)
  adapter = _nonzero(adapter)
  got = c3a.intercepted(qmodel.apply)({"params": c3a.combine(adapter, base)}, x)
  float_params = c3a.combine(adapter, c3a.quantize.dequantize(base))
  want = c3a.intercepted(model.apply)({"params": float_params}, x)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_merge_and_fold_refuse_a_quantized_kernel():
  _, qmodel, _, adapted, x, _ = _adapted_linen(*LINEN["dense"][:2], SETTINGS["int8"])
  with pytest.raises(ValueError, match=r"merge: layer '' has a kernel quantized by Qwix \(int8\)"):
    c3a.merge(adapted)
  with pytest.raises(ValueError, match=r"quantized by Qwix \(int8\); strategy='fold'"):
    c3a.intercepted(qmodel.apply, strategy="fold")({"params": adapted}, x)


def test_a_block_size_that_does_not_divide_a_quantized_layer_is_named():
  model = nn.Dense(24)
  x = jnp.ones((2, 16))
  params = model.init(jax.random.key(0), x)["params"]
  _, qparams = c3a.quantize.quantize_linen(model, params, x, weights="int8")
  with pytest.raises(ValueError, match=r"block size 16 does not divide layer .*: \[1, 2, 4, 8\]"):
    c3a.attach(qparams, c3a.C3AConfig(block_size=16, target_modules=".*"), jax.random.key(1))


def test_quantize_names_a_weight_type_it_does_not_offer():
  with pytest.raises(ValueError, match=r"weights='int9' is not one of \('int8'"):
    c3a.quantize.provider("int9")


class _MLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(16, 32, rngs=rngs)
    self.fc2 = nnx.Linear(32, 16, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x)))


def _bump(model):
  for _, v in nnx.iter_graph(model):
    if isinstance(v, c3a.C3AParam):
      v[...] = v[...] + 0.05 * jax.random.normal(jax.random.key(3), v[...].shape)


def _dequantized(qmodel):
  """A float _MLP holding what ``qmodel`` computes with: Qwix's dequantized weights, the same
  biases and C3A kernels."""
  model = _MLP(nnx.Rngs(5))
  c3a.set_nnx_params(model, c3a.quantize.dequantize(c3a.nnx_params(qmodel)))
  return model


@pytest.mark.parametrize(
  "order",
  ["quantize_then_attach", pytest.param("attach_then_quantize", marks=pytest.mark.integration)],
)
def test_nnx_either_order_matches_the_dequantized_model(order):
  x = jax.random.normal(jax.random.key(0), (8, 16))
  cfg = c3a.C3AConfig(block_size=8, target_modules=["fc1", "fc2"])
  settings = {"weights": "int4", "tile_size": 8, "module_path": "fc.*"}
  if order == "quantize_then_attach":
    q = c3a.quantize.quantize_nnx(_MLP(nnx.Rngs(0)), x, **settings)
    model = c3a.attach(q, cfg, jax.random.key(1))
  else:
    adapted = c3a.attach(_MLP(nnx.Rngs(0)), cfg, jax.random.key(1))
    model = c3a.quantize.quantize_nnx(adapted, x, **settings)
  _bump(model)
  assert c3a._qwix.is_quantized(model.fc1.kernel)

  @nnx.jit
  def run(m, x):
    with c3a.intercept():
      return m(x)

  reference = _dequantized(model)
  with c3a.intercept("fft"):
    want = reference(x)
  np.testing.assert_allclose(run(model, x), want, atol=1e-5)
  grads = nnx.grad(lambda m: jnp.sum(run(m, x) ** 2), argnums=nnx.DiffState(0, c3a.C3AParam))(model)
  assert {
    type(v).__name__ for v in jax.tree.leaves(grads, is_leaf=lambda v: isinstance(v, nnx.Variable))
  } == {"C3AParam"}
  with pytest.raises(ValueError, match="merge: layer 'fc1' has a kernel quantized by Qwix"):
    c3a.merge(model)


@pytest.mark.integration
def test_nnx_quantized_kernel_whose_input_axis_is_not_first_is_refused_by_name():
  class Proj(nnx.Module):  # a Tunix / Gemma einsum module
    def __init__(self, spec, shape, rngs):
      self.einsum_str = spec
      self.w = nnx.Param(jax.random.normal(rngs.params(), shape))

    def __call__(self, x):
      return jnp.einsum(self.einsum_str, x, self.w[...])

  class Attention(nnx.Module):
    def __init__(self, rngs):
      self.q = Proj("BTD,NDH->BTNH", (2, 16, 8), rngs)  # Gemma's query: D is not first
      self.o = Proj("BTNH,NHD->BTD", (2, 8, 16), rngs)

    def __call__(self, x):
      return self.o(self.q(x))

  x = jnp.ones((1, 3, 16))
  q = c3a.quantize.quantize_nnx(Attention(nnx.Rngs(0)), x, weights="int8")
  with pytest.raises(
    ValueError, match=r"C3A target 'q' .*quantized by Qwix \(int8\) and its input"
  ):
    c3a.attach(q, c3a.C3AConfig(block_size=8, target_modules=["q"]), jax.random.key(1))
  adapted = c3a.attach(q, c3a.C3AConfig(block_size=8, target_modules=["o"]), jax.random.key(1))
  _bump(adapted)
  with c3a.intercept():
    got = adapted(x)
  reference = Attention(nnx.Rngs(5))
  for name in ("q", "o"):
    getattr(reference, name).w[...] = qwix.dequantize(getattr(adapted, name).w.array)
  c3a.set_nnx_params(reference, {"o": {"c3a_kernel": adapted.o.c3a_kernel[...]}})
  with c3a.intercept("fft"):
    np.testing.assert_allclose(got, reference(x), atol=1e-4 * float(jnp.abs(got).max()))


# nf4's uint4 values are not a type tensorstore stores; a run re-quantizes its base from the
# full-precision weights (deterministic), and its checkpoints hold the adapter alone.
@pytest.mark.parametrize("setting", ["int8", pytest.param("int4", marks=pytest.mark.integration)])
def test_orbax_restores_a_quantized_base_with_its_adapter_exactly(tmp_path, setting):
  orbax = pytest.importorskip("orbax.checkpoint")
  _, _, _, adapted, _, _ = _adapted_linen(*LINEN["dense"][:2], SETTINGS[setting])
  with orbax.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", adapted)
  with orbax.StandardCheckpointer() as ckpt:
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), adapted)
    restored = ckpt.restore(tmp_path / "ckpt", target)
  assert jax.tree.structure(restored) == jax.tree.structure(adapted)
  for a, b in zip(jax.tree.leaves(adapted), jax.tree.leaves(restored), strict=True):
    assert a.dtype == b.dtype and np.array_equal(
      np.asarray(a, np.float32), np.asarray(b, np.float32)
    )


def test_linen_every_order_gives_one_model(tmp_path):
  """Attach then quantize, quantize then attach, and a saved adapter loaded onto the quantized
  params: one adapter, one quantized base, the same outputs."""

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.DenseGeneral((2, 16), name="proj")(x)

  model = Model()
  x = jax.random.normal(jax.random.key(0), (4, 16))
  params = model.init(jax.random.key(1), x)["params"]
  cfg = c3a.C3AConfig(block_size=8, target_modules=["proj"], init_weights="gaussian")
  adapted = c3a.attach(
    params, cfg, jax.random.key(2), forward=lambda p: model.apply({"params": p}, x)
  )
  c3a.save_adapter(str(tmp_path / "adapter"), adapted, cfg)
  qmodel, attach_first = c3a.quantize.quantize_linen(model, adapted, x, weights="int8")
  _, qparams = c3a.quantize.quantize_linen(model, params, x, weights="int8")
  adapter, _ = c3a.load_adapter(str(tmp_path / "adapter"), qparams)
  run = c3a.intercepted(qmodel.apply)
  want = run({"params": attach_first}, x)
  np.testing.assert_array_equal(run({"params": c3a.combine(adapter, qparams)}, x), want)
  assert not np.allclose(want, qmodel.apply({"params": qparams}, x), atol=1e-3)


@pytest.mark.parametrize(
  "weights", ["int8", pytest.param("float8_e4m3fn", marks=pytest.mark.integration)]
)
def test_a_bfloat16_step_leaves_the_quantized_weights_as_qwix_stored_them(weights):
  _, qmodel, _, adapted, x, cfg = _adapted_linen(*LINEN["dense"][:2], {"weights": weights})
  adapter, base = c3a.split(adapted)
  cast = c3a.training.cast_frozen(base, jnp.bfloat16)
  assert cast["bias"].dtype == jnp.bfloat16
  assert jax.tree.map(lambda a: a.dtype, cast["kernel"]) == jax.tree.map(
    lambda a: a.dtype, base["kernel"]
  )
  tx = c3a.optimizer(optax.adam(1e-2), adapted, cfg)
  step = c3a.make_train_step(
    lambda p, b, r: jnp.sum(qmodel.apply({"params": p}, b) ** 2), tx, compute_dtype=jnp.bfloat16
  )
  new, metrics = jax.jit(step)(c3a.TrainState.create(adapter, tx), base, x)
  assert np.isfinite(metrics["loss"]) and not np.allclose(
    new.params["c3a_kernel"], adapter["c3a_kernel"]
  )


def test_the_provider_leaves_convolutions_alone():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(8, name="fc")(nn.Conv(8, (3,), name="conv")(x).reshape(x.shape[0], -1))

  model = Net()
  x = jnp.ones((2, 4, 3))
  params = model.init(jax.random.key(0), x)["params"]
  qmodel, qparams = c3a.quantize.quantize_linen(model, params, x, weights="int8")
  assert c3a.tree.is_quantized(qparams["fc"]["kernel"])
  assert not c3a.tree.is_quantized(qparams["conv"]["kernel"])
  np.testing.assert_allclose(
    qmodel.apply({"params": qparams}, x), model.apply({"params": params}, x), atol=0.05
  )
