"""C3A on Flax NNX models: layers, NNX idioms, merge, PEFT files and stacked layers.

References: each layer with ``kernel + delta`` for its weight, the delta from the float64
definition (tests/reference.py) laid out by the layout rule; for training, the C3A kernels move
and nothing else does.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import c3a_jax as c3a
from tests.reference import dense_reference


class TunixEinsum(nnx.Module):
  """The einsum module of Tunix's and Gemma's NNX models: one weight ``w``, an ``einsum_str``."""

  def __init__(self, einsum_str, shape, *, rngs):
    self.einsum_str = einsum_str
    self.w = nnx.Param(nnx.initializers.normal()(rngs.params(), shape))

  def __call__(self, x):
    return jnp.einsum(self.einsum_str, x, self.w[...])


class Projection(nnx.Module):
  """A user's layer, unknown to c3a until registered."""

  def __init__(self, *, rngs):
    self.weight = nnx.Param(nnx.initializers.normal()(rngs.params(), (16, 2, 8)))

  def __call__(self, x):
    return jnp.einsum("btd,dnh->btnh", x, self.weight[...])


c3a.register_layer(Projection, kernel="weight", einsum="btd,dnh->btnh")

LAYERS = {
  "linear": (lambda r: nnx.Linear(16, 8, rngs=r), (2, 3, 16), "kernel"),
  "linear_general": (lambda r: nnx.LinearGeneral(16, (2, 8), rngs=r), (2, 3, 16), "kernel"),
  "linear_general_out": (
    lambda r: nnx.LinearGeneral((2, 8), 16, axis=(-2, -1), rngs=r),
    (2, 3, 2, 8),
    "kernel",
  ),
  "einsum": (
    lambda r: nnx.Einsum("btd,dnh->btnh", (16, 2, 8), (2, 8), rngs=r),
    (2, 3, 16),
    "kernel",
  ),
  "tunix_einsum": (lambda r: TunixEinsum("BTNH,NHD->BTD", (2, 8, 16), rngs=r), (2, 3, 2, 8), "w"),
  # Gemma's query einsum: the input's axis D is not the kernel's first; (N, D, H) -> (D, N, H).
  "gemma_q": (
    lambda r: TunixEinsum("BTD,NDH->BTNH", (2, 16, 8), rngs=r),
    (2, 3, 16),
    "w",
    (1, 0, 2),
  ),
  # The input's axis last in the kernel: (N, H, D) -> (D, N, H), a permutation that is not its
  # own inverse, so reading the view and writing it back must undo each other.
  "einsum_in_last": (
    lambda r: nnx.Einsum("btd,nhd->btnh", (2, 8, 16), (2, 8), rngs=r),
    (2, 3, 16),
    "kernel",
    (2, 0, 1),
  ),
  "registered": (lambda r: Projection(rngs=r), (2, 3, 16), "weight"),
}


# The default tier runs Gemma's einsum (the input axis inside the kernel); integration all.
@pytest.mark.parametrize(
  "name",
  [
    pytest.param(n, marks=() if n in ("gemma_q", "einsum_in_last") else pytest.mark.integration)
    for n in sorted(LAYERS)
  ],
)
def test_nnx_layers_equal_the_reference(name):
  make, shape, weight, *perm = LAYERS[name]
  layer = make(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), shape)
  cfg = c3a.C3AConfig(block_size=4, target_modules=".*", init_weights="gaussian")
  before = np.asarray(layer(x))
  adapted = c3a.attach(layer, cfg, jax.random.key(2))
  assert not hasattr(layer, "c3a_kernel")  # the input is untouched
  np.testing.assert_array_equal(layer(x), before)
  assert isinstance(adapted.c3a_kernel, c3a.C3AParam)

  kernel = getattr(adapted, weight)[...]
  reference = nnx.clone(layer)
  # The layout rule: (d_in, d_out) reshaped to the kernel's axes in "in"-first order.
  perm = perm[0] if perm else tuple(range(kernel.ndim))
  delta = dense_reference(np.asarray(adapted.c3a_kernel[...])).T
  delta = delta.reshape([kernel.shape[i] for i in perm]).transpose(np.argsort(perm))
  getattr(reference, weight)[...] = kernel + delta.astype(np.float32)
  want = reference(x)
  np.testing.assert_allclose(adapted(x), want, atol=2e-5)  # adapted outside intercept too
  for strategy in ("fft", "fold"):  # "fold": x @ (kernel + delta), where the layer allows it
    with c3a.intercept(strategy=strategy):
      np.testing.assert_allclose(adapted(x), want, atol=2e-5)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(adapted, x), want, atol=2e-5)

  merged = c3a.merge(adapted)
  assert type(merged) is type(layer) and not hasattr(merged, "c3a_kernel")
  np.testing.assert_allclose(merged(x), want, atol=2e-5)
  restored = c3a.unmerge(merged, nnx.state(adapted, c3a.C3AParam))
  np.testing.assert_allclose(restored(x), want, atol=2e-5)
  np.testing.assert_allclose(getattr(restored, weight)[...], kernel, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("gpu", marks=pytest.mark.integration)])
def test_nnx_bfloat16_linear_folds_on_cpu_only(monkeypatch, backend):
  """A bfloat16 nnx.Linear folds where XLA runs its matmul in float32 (CPU), returns bfloat16,
  and equals the layer's arithmetic in float64 rounded once; elsewhere it adds the delta."""
  from c3a_jax import ops

  calls = []
  real_fold, real_can_fold = ops.fold, ops.can_fold
  monkeypatch.setattr(ops, "fold", lambda *a, **k: calls.append(1) or real_fold(*a, **k))
  monkeypatch.setattr(
    ops, "can_fold", lambda dtype, precision=None: real_can_fold(dtype, backend, precision)
  )
  layer = nnx.Linear(16, 12, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  cfg = c3a.C3AConfig(block_size=4, target_modules=".*", init_weights="gaussian")
  adapted = c3a.attach(layer, cfg, jax.random.key(2))
  x = jax.random.normal(jax.random.key(1), (40, 16), jnp.bfloat16)
  with c3a.intercept():
    y = adapted(x)
  assert bool(calls) == (backend == "cpu") and y.dtype == jnp.bfloat16
  f64 = lambda a: np.asarray(a, np.float64)
  delta = dense_reference(np.asarray(adapted.c3a_kernel[...])).T
  want = f64(x) @ (f64(adapted.kernel[...]) + delta) + f64(adapted.bias[...])
  np.testing.assert_allclose(f64(y), want, rtol=2**-7, atol=2**-7)


class Decoder(nnx.Module):
  """Tunix-style: a list of layers with einsum attention and Linear MLPs, then a head."""

  def __init__(self, *, rngs, layers=2):
    self.layers = nnx.List([_DecoderLayer(rngs=rngs) for _ in range(layers)])
    self.lm_head = nnx.Linear(16, 8, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return self.lm_head(x)


class _Attn(nnx.Module):
  def __init__(self, *, rngs):
    self.q_proj = TunixEinsum("BTD,DNH->BTNH", (16, 2, 8), rngs=rngs)
    self.v_proj = TunixEinsum("BTD,DNH->BTNH", (16, 2, 8), rngs=rngs)
    self.o_proj = TunixEinsum("BTNH,NHD->BTD", (2, 8, 16), rngs=rngs)

  def __call__(self, x):
    return self.o_proj(self.q_proj(x) * self.v_proj(x))


class _DecoderLayer(nnx.Module):
  def __init__(self, *, rngs):
    self.attn = _Attn(rngs=rngs)
    self.mlp = nnx.Linear(16, 16, rngs=rngs)

  def __call__(self, x):
    return x + self.mlp(jax.nn.gelu(self.attn(x)))


@pytest.fixture(scope="module")
def decoder():
  model = Decoder(rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 3, 16))
  cfg = c3a.C3AConfig(block_size=4, target_modules=["q_proj", "v_proj", "mlp"])
  return model, x, cfg


def test_nnx_idioms_train_the_adapter_alone(decoder):
  model, x, cfg = decoder
  adapted = c3a.attach(model, cfg.replace(init_weights="gaussian"), jax.random.key(2))
  assert c3a.summary(adapted, cfg).trainable == 2 * 3 * (4 * 4 * 4)
  optimizer = nnx.Optimizer(adapted, optax.adam(1e-2), wrt=c3a.C3AParam)

  @nnx.jit
  def step(model, optimizer, x):
    def loss(model):
      return jnp.mean(model(x) ** 2)

    value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, c3a.C3AParam))(model)
    optimizer.update(model, grads)
    return value

  before = nnx.state(adapted, nnx.Param)
  before = jax.tree.map(np.asarray, before)
  losses = [float(step(adapted, optimizer, x)) for _ in range(3)]
  assert losses[-1] < losses[0]
  after = nnx.state(adapted, nnx.Param)
  moved = jax.tree.map(lambda a, b: bool((np.asarray(a) != b).any()), after, before)
  flat = {".".join(map(str, p)): v for p, v in jax.tree_util.tree_flatten_with_path(moved)[0]}
  assert all(v == ("c3a_kernel" in k) for k, v in flat.items()), flat
  c3a_state, rest = nnx.split(adapted, c3a.C3AParam, ...)[1:]
  assert len(jax.tree.leaves(c3a_state)) == 6 and len(jax.tree.leaves(rest)) > 6


def test_nnx_adapters_save_and_load_as_peft_files(decoder, tmp_path):
  model, x, cfg = decoder
  adapted = c3a.attach(model, cfg.replace(init_weights="gaussian"), jax.random.key(2))
  hf = [(r"^layers\.(\d+)\.attn\.", r"model.layers.\1.self_attn."), (r"^layers\.", "model.layers.")]
  c3a.save_adapter(str(tmp_path / "a"), adapted, cfg, key_map=hf)
  saved = c3a.C3AConfig.load(str(tmp_path / "a"))
  assert "model.layers.1.self_attn.q_proj" in saved.target_modules
  loaded, _ = c3a.load_adapter(str(tmp_path / "a"), model, key_map=hf)
  assert not hasattr(model.layers[0].mlp, "c3a_kernel")
  np.testing.assert_allclose(loaded(x), adapted(x), atol=1e-6)
  assert not np.allclose(model(x), adapted(x), atol=1e-3)


def test_nnx_layers_c3a_cannot_adapt_are_refused_at_attach():
  cfg = c3a.C3AConfig(block_size=4, target_modules=".*")
  rngs = nnx.Rngs(0)
  with pytest.raises(ValueError, match=r"'' \(LinearGeneral.*batch_axis"):
    c3a.attach(nnx.LinearGeneral(8, 8, batch_axis={0: 2}, rngs=rngs), cfg, jax.random.key(0))
  with pytest.raises(ValueError, match=r"Conv is not a layer C3A adapts"):
    c3a.attach(nnx.Conv(8, 8, (3,), rngs=rngs), cfg, jax.random.key(0))
  with pytest.raises(ValueError, match=r"batch or summed axes"):
    c3a.attach(TunixEinsum("BNH,NHK->BNK", (2, 8, 8), rngs=rngs), cfg, jax.random.key(0))
  with pytest.raises(TypeError, match=r"attaches to the NNX model itself"):
    c3a.attach(nnx.state(nnx.Linear(8, 8, rngs=rngs)), cfg, jax.random.key(0))
  bridged = nnx.bridge.ToLinen(nnx.Linear, args=(8, 8))
  linen_params = bridged.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
  linen_params = c3a.attach(linen_params, cfg, jax.random.key(1))
  with pytest.raises(ValueError, match=r"bridged with nnx.bridge.ToLinen and holds C3A kernels"):
    c3a.intercepted(bridged.apply)({"params": linen_params}, jnp.ones((1, 8)))
  hand_set = nnx.Linear(8, 8, rngs=rngs)
  hand_set.c3a_kernel = nnx.Param(jnp.ones((2, 2, 4)))
  with pytest.raises(ValueError, match=r"holds a c3a_kernel that c3a.attach did not set"):
    c3a.summary(hand_set)
  with pytest.raises(ValueError, match=r"block size 3 does not divide layer ''"):
    c3a.attach(nnx.Linear(8, 8, rngs=rngs), cfg.replace(block_size=3), jax.random.key(0))


def linear_stack(layers: int = 3) -> nnx.Linear:
  """``layers`` stacked ``nnx.Linear(16, 16)`` (``nnx.vmap``), for :func:`run_stack`."""

  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return nnx.Linear(16, 16, rngs=nnx.Rngs(key))

  return make(jax.random.split(jax.random.key(0), layers))


@nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
def run_stack(layer, x):
  return jnp.tanh(layer(x))


def test_nnx_scan_over_stacked_layers():
  stack = linear_stack()
  cfg = c3a.C3AConfig(block_size=4, target_modules=".*", init_weights="gaussian")
  adapted = c3a.attach(stack, cfg, jax.random.key(1))
  assert adapted.c3a_kernel.shape == (3, 4, 4, 4)
  run = run_stack

  x = jax.random.normal(jax.random.key(2), (2, 16))
  want = x
  for i in range(3):
    kernel = adapted.kernel[i] + dense_reference(np.asarray(adapted.c3a_kernel[i])).T
    want = jnp.tanh(want @ kernel.astype(np.float32) + adapted.bias[i])
  np.testing.assert_allclose(run(adapted, x), want, atol=2e-5)
  np.testing.assert_allclose(run(c3a.merge(adapted), x), want, atol=2e-5)
