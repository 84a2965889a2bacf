"""Every block_circulant_matmul strategy against the dense reference, values and gradients.

The default tier runs each strategy jitted on a few shapes; the ``integration`` tier runs the
whole matrix: every shape, eagerly and under ``jit``.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import c3a_jax as c3a
from c3a_jax import ops
from tests.reference import dense_reference, kernel_grad_reference

STRATEGIES = list(ops.STRATEGIES)
# (m, n, b): b = 1, odd and even blocks, one block, many blocks (the dot_general paths), b > 16.
SHAPES = [
  (1, 1, 1),
  (3, 2, 1),
  (2, 3, 5),
  (3, 2, 7),
  (1, 1, 2),
  (2, 2, 16),
  (2, 3, 33),
  (2, 20, 3),
  (20, 18, 2),
  (1, 2, 64),
]
# The default tier's few: b = 1, an odd b, an even b past the dense threshold, many blocks.
FEW = {(1, 1, 1), (2, 3, 5), (2, 2, 16), (20, 18, 2)}
CASES = [
  pytest.param(
    m,
    n,
    b,
    s,
    jit,
    id=f"{s}-{m}x{n}x{b}-{'jit' if jit else 'eager'}",
    marks=[] if jit and (m, n, b) in FEW else [pytest.mark.integration],
  )
  for s in STRATEGIES
  for m, n, b in SHAPES
  for jit in (True, False)
]


def _case(m, n, b, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(m, n, b)).astype(np.float32)
  x = rng.normal(size=(2, 3, n * b)).astype(np.float32)
  g = rng.normal(size=(2, 3, m * b)).astype(np.float32)
  return x, w, g


@pytest.mark.backend_precision
@pytest.mark.parametrize("m,n,b,strategy,jit", CASES)
def test_forward_matches_dense_reference(m, n, b, strategy, jit):
  x, w, _ = _case(m, n, b)
  f = (jax.jit if jit else lambda f: f)(
    lambda x, w: ops.block_circulant_matmul(x, w, strategy=strategy)
  )
  y = f(jnp.asarray(x), jnp.asarray(w))
  assert y.shape == (2, 3, m * b) and y.dtype == jnp.float32
  # float32 arithmetic against a float64 reference: 1e-5 relative, 1e-5 absolute.
  np.testing.assert_allclose(y, x @ dense_reference(w).T, rtol=1e-5, atol=1e-5)


@pytest.mark.backend_precision
@pytest.mark.parametrize("m,n,b,strategy,jit", CASES)
def test_gradients_match_dense_reference(m, n, b, strategy, jit):
  x, w, g = _case(m, n, b, seed=1)
  loss = lambda x, w: jnp.sum(ops.block_circulant_matmul(x, w, strategy=strategy) * g)
  grad = jax.grad(loss, argnums=(0, 1))
  gx, gw = (jax.jit(grad) if jit else grad)(jnp.asarray(x), jnp.asarray(w))
  assert gx.dtype == jnp.float32 and gw.dtype == jnp.float32
  np.testing.assert_allclose(gx, g @ dense_reference(w), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gw, kernel_grad_reference(x, w, g), rtol=1e-4, atol=1e-4)


@pytest.mark.backend_precision
@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize(
  "tokens",
  [
    pytest.param(1, marks=pytest.mark.integration),
    pytest.param(8, marks=pytest.mark.integration),
    11,
  ],
)
def test_kernel_grad_alone_matches_reference(monkeypatch, backend, tokens):
  """The fold's kernel gradient: on CPU in chunks of about 4 tokens (uneven where 4 does not
  divide), elsewhere over the whole arrays; bfloat16 activations cast where used."""
  from c3a_jax.ops import _kernel_grad

  m, n, b = 3, 2, 6
  monkeypatch.setattr(_kernel_grad, "_CHUNK_BYTES", 4 * 4 * n * b)
  rng = np.random.default_rng(tokens)
  w = rng.normal(size=(m, n, b)).astype(np.float32)
  x = rng.normal(size=(tokens, n * b)).astype(np.float32)
  g = rng.normal(size=(tokens, m * b)).astype(np.float32)
  f = jax.jit(lambda x, g, w: _kernel_grad.kernel_grad(x, g, w, backend=backend))
  np.testing.assert_allclose(f(x, g, w), kernel_grad_reference(x, w, g), rtol=1e-4, atol=1e-5)
  xb = jnp.asarray(x, jnp.bfloat16)
  want = kernel_grad_reference(np.asarray(xb, np.float32), w, g)
  np.testing.assert_allclose(f(xb, g, w), want, rtol=1e-4, atol=1e-5)


@pytest.mark.backend_precision
@pytest.mark.parametrize(
  "strategy",
  [
    pytest.param(s, marks=[pytest.mark.integration] * (s not in ("auto", "fold")))
    for s in STRATEGIES
  ],
)
def test_low_precision_and_token_counts(strategy):
  x, w, _ = _case(3, 2, 8)
  for tokens in (1, 7, 64):  # odd token counts reach every reshape path
    xt = np.resize(x.reshape(-1, 16), (tokens, 16))
    y = ops.block_circulant_matmul(jnp.asarray(xt), jnp.asarray(w), strategy=strategy)
    np.testing.assert_allclose(y, xt @ dense_reference(w).T, rtol=1e-5, atol=1e-5)
  y = ops.block_circulant_matmul(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w), strategy=strategy)
  assert y.dtype == jnp.bfloat16
  gx = jax.grad(
    lambda x: jnp.sum(ops.block_circulant_matmul(x, jnp.asarray(w), strategy=strategy))
  )(jnp.asarray(x, jnp.bfloat16))
  assert gx.dtype == jnp.bfloat16


def test_auto_is_deterministic_and_valid():
  shapes = [
    ((8, 128, 768), (6, 6, 128)),
    ((2048, 4096), (16, 16, 256)),
    ((4, 768), (6, 6, 128)),
    ((4096, 768), (96, 96, 8)),
    ((128, 4096), (1, 1, 4096)),
  ]
  for x_shape, w_shape in shapes:
    picks = {ops.choose_strategy(x_shape, w_shape) for _ in range(3)}
    assert len(picks) == 1 and picks <= set(ops.STRATEGIES) - {"auto"}
    for backend in ("cpu", "gpu", "tpu"):
      assert ops.choose_strategy(x_shape, w_shape, backend) in set(ops.STRATEGIES) - {"auto"}
  # auto computes exactly what its pick computes.
  x, w, _ = _case(2, 3, 16)
  pick = ops.choose_strategy(x.shape, w.shape)
  np.testing.assert_array_equal(
    ops.block_circulant_matmul(x, w), ops.block_circulant_matmul(x, w, strategy=pick)
  )


def test_unknown_strategy_is_an_error():
  with pytest.raises(ValueError, match=r"strategy='pallas' is not one of \('auto', 'fft'"):
    ops.block_circulant_matmul(jnp.ones((2, 4)), jnp.ones((1, 1, 4)), strategy="pallas")
  with pytest.raises(ValueError, match=r"intercept: strategy='x'"), c3a.intercept(strategy="x"):
    pass
  with pytest.raises(ValueError, match=r"intercepted: strategy='x'"):
    c3a.intercepted(lambda: None, strategy="x")


@pytest.mark.backend_precision
def test_merged_is_a_deprecated_name_for_fold():
  x, w, _ = _case(2, 3, 4)
  with pytest.warns(DeprecationWarning, match=r"strategy='merged' is deprecated.*'fold'"):
    y = ops.block_circulant_matmul(jnp.asarray(x), jnp.asarray(w), strategy="merged")
  np.testing.assert_allclose(y, x @ dense_reference(w).T, rtol=1e-5, atol=1e-5)
  # The warnings name the caller's line (through intercept's contextmanager too), so that
  # Python's default filters show them.
  with pytest.warns(DeprecationWarning, match=r"intercept: strategy='merged'") as record:
    with c3a.intercept(strategy="merged"):
      pass
  assert record[0].filename == __file__
  with pytest.warns(DeprecationWarning, match=r"make_train_step: strategy='merged'") as record:
    c3a.make_train_step(lambda p, b, r: 0.0, optax.sgd(1.0), strategy="merged")
  assert record[0].filename == __file__
  with pytest.raises(ValueError, match=r"make_train_step: strategy='rfft' is not one of"):
    c3a.make_train_step(lambda p, b, r: 0.0, optax.sgd(1.0), strategy="rfft")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ops.block_circulant_matmul(jnp.asarray(x), jnp.asarray(w), strategy="fold")


def test_strategy_is_not_part_of_the_adapter_config():
  assert "strategy" not in c3a.C3AConfig().to_dict()
  with pytest.raises(TypeError, match="strategy"):
    c3a.C3AConfig(strategy="fft")
  # c3a-jax 0.1 wrote it into adapter_config.json: such files still load, with a warning.
  with pytest.warns(UserWarning, match=r"old.json: ignoring strategy='dft'.*c3a.intercept"):
    cfg = c3a.C3AConfig.from_dict(
      {"peft_type": "C3A", "block_size": 4, "strategy": "dft"}, source="old.json"
    )
  assert cfg == c3a.C3AConfig(block_size=4)


# The default tier: "auto" (which folds here) and a spectral path; every strategy is tested
# against the reference above, and the interceptor passes the name on.
@pytest.mark.parametrize(
  "strategy",
  [pytest.param(s, marks=[pytest.mark.integration] * (s != "auto")) for s in STRATEGIES],
)
def test_interceptor_strategies_agree(strategy):
  model = nn.Sequential([nn.Dense(12), nn.relu, nn.Dense(6)])
  x = jax.random.normal(jax.random.key(0), (5, 9))
  params = model.init(jax.random.key(1), x)["params"]
  params["layers_0"]["c3a_kernel"] = jax.random.normal(jax.random.key(2), (4, 3, 3))
  params["layers_2"]["c3a_kernel"] = jax.random.normal(jax.random.key(3), (2, 4, 3))
  ref = jax.jit(c3a.intercepted(model.apply, strategy="fft"))({"params": params}, x)
  y = jax.jit(c3a.intercepted(model.apply, strategy=strategy))({"params": params}, x)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  with c3a.intercept(strategy=strategy):
    y2 = model.apply({"params": params}, x)
  np.testing.assert_allclose(y2, ref, rtol=1e-5, atol=1e-5)
  grad = lambda s: jax.jit(
    jax.grad(lambda p: jnp.sum(c3a.intercepted(model.apply, strategy=s)({"params": p}, x) ** 2))
  )(params)
  for a, b in zip(jax.tree.leaves(grad(strategy)), jax.tree.leaves(grad("fft")), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_nested_intercept_innermost_strategy_applies(monkeypatch):
  seen = []
  real = ops.block_circulant_matmul

  def spy(x, w, *, strategy="auto"):
    seen.append(strategy)
    return real(x, w, strategy=strategy)

  monkeypatch.setattr(ops, "block_circulant_matmul", spy)
  model = nn.Dense(4)
  params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  params["c3a_kernel"] = jnp.ones((2, 2, 2))
  with c3a.intercept(strategy="dense"):
    with c3a.intercept(strategy="freq_major"):
      model.apply({"params": params}, jnp.ones((1, 4)))
    model.apply({"params": params}, jnp.ones((1, 4)))
  model.apply({"params": params}, jnp.ones((1, 4)))  # outside: base model, no delta
  assert seen == ["freq_major", "dense"]


@pytest.mark.parametrize(
  "backend,precision",
  [
    ("cpu", None),
    pytest.param("gpu", None, marks=pytest.mark.integration),
    pytest.param("gpu", "highest", marks=pytest.mark.integration),
  ],
)
def test_interceptor_folds_where_the_layer_computes_in_float32(monkeypatch, backend, precision):
  """The delta is folded into a plain Dense (values and every gradient, the base kernel's
  included, as the additive path) where the layer's product is full float32: on CPU a float32
  or a bfloat16 one (XLA:CPU runs the latter in float32 anyway) under "auto"; elsewhere a
  float32 one at HIGHEST under "fold" ("auto" does not fold there). ``backend`` stands for
  where ``ops.can_fold`` thinks it runs."""
  calls = []
  real_fold, real_can_fold = ops.fold, ops.can_fold
  monkeypatch.setattr(ops, "fold", lambda *a, **k: calls.append(1) or real_fold(*a, **k))
  monkeypatch.setattr(
    ops, "can_fold", lambda dtype, precision=None: real_can_fold(dtype, backend, precision)
  )
  strategy = "auto" if backend == "cpu" else "fold"
  x = jax.random.normal(jax.random.key(0), (3, 5, 16))
  for dtype in (jnp.float32, jnp.bfloat16):
    folds = backend == "cpu" or (dtype == jnp.float32 and precision == "highest")
    model = nn.Dense(12, dtype=dtype, param_dtype=dtype, precision=precision)
    params = dict(model.init(jax.random.key(1), x)["params"])
    params["c3a_kernel"] = jax.random.normal(jax.random.key(2), (3, 4, 4))
    apply = lambda p, x, s: c3a.intercepted(model.apply, strategy=s)({"params": p}, x)
    loss = lambda p, x, s: jnp.sum(jnp.sin(apply(p, x, s)))
    calls.clear()
    y = jax.jit(apply, static_argnums=2)(params, x, strategy)
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)(params, x, strategy)
    assert bool(calls) == folds and y.dtype == dtype
    # The layer's arithmetic in float64, rounded once to its dtype.
    xd, kernel = (np.asarray(jnp.asarray(a, dtype), np.float64) for a in (x, params["kernel"]))
    exact = xd @ (kernel + dense_reference(np.asarray(params["c3a_kernel"])).T)
    exact += np.asarray(params["bias"], np.float64)
    tol = 1e-5 if dtype == jnp.float32 else 2**-8
    np.testing.assert_allclose(np.asarray(y, np.float64), exact, rtol=tol, atol=tol)
    want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)(params, x, "fft")
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      assert a.dtype == b.dtype
      np.testing.assert_allclose(
        np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol
      )


def test_interceptor_folds_boxed_params(monkeypatch):
  """Params boxed with partitioning metadata (nn.with_partitioning) fold as Dense unboxes them."""
  calls = []
  real = ops.fold
  monkeypatch.setattr(ops, "fold", lambda *a, **k: calls.append(1) or real(*a, **k))
  model = nn.Dense(8, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "m")))
  x = jax.random.normal(jax.random.key(0), (40, 8))
  params = dict(model.init(jax.random.key(1), x)["params"])
  assert isinstance(params["kernel"], nn.Partitioned)
  params["c3a_kernel"] = jax.random.normal(jax.random.key(2), (2, 2, 4))
  got = c3a.intercepted(model.apply)({"params": params}, x)
  want = x @ (nn.unbox(params["kernel"]) + ops.delta_weight(params["c3a_kernel"])) + params["bias"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert calls
