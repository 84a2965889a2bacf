"""c3a_jax.ops against PEFT's vectors, a dense-matrix reference and finite differences."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from c3a_jax import ops
from tests.reference import dense_reference, kernel_grad_reference

# Ops alone: at the backend's default matmul precision, which C3A's own precision overrides.
pytestmark = pytest.mark.backend_precision

SHAPES = [(1, 1, 1), (2, 3, 1), (1, 1, 2), (2, 2, 3), (3, 2, 5), (2, 1, 7), (1, 2, 8), (2, 2, 16)]


@pytest.mark.parametrize("m,n,b", SHAPES)
def test_delta_weight_matches_dense_reference(m, n, b):
  w = np.random.default_rng(0).normal(size=(m, n, b)).astype(np.float32)
  np.testing.assert_allclose(
    ops.delta_weight(jnp.asarray(w)), dense_reference(w).T, rtol=1e-6, atol=1e-7
  )


@pytest.mark.parametrize("m,n,b", SHAPES)
def test_matmul_matches_dense_reference(m, n, b, maybe_jit):
  rng = np.random.default_rng(1)
  w = rng.normal(size=(m, n, b)).astype(np.float32)
  x = rng.normal(size=(2, 3, n * b)).astype(np.float32)  # two leading axes
  y = maybe_jit(ops.block_circulant_matmul)(jnp.asarray(x), jnp.asarray(w))
  assert y.shape == (2, 3, m * b) and y.dtype == jnp.float32
  np.testing.assert_allclose(y, x @ dense_reference(w).T, rtol=1e-5, atol=1e-6)


def _peft_cases(shared):
  data = np.load(os.path.join(shared, "peft_c3a_ops.npz"))
  return data, sorted({k.split("/")[0] for k in data.files})


def test_peft_vectors(shared_fixtures, maybe_jit):
  data, cases = _peft_cases(shared_fixtures)
  assert len(cases) >= 6
  for case in cases:
    get = lambda name: jnp.asarray(data[f"{case}/{name}"], jnp.float32)
    x, w, g = get("x"), get("kernel"), get("g")
    y = maybe_jit(ops.block_circulant_matmul)(x, w)
    np.testing.assert_allclose(y, data[f"{case}/y"], rtol=1e-5, atol=1e-6, err_msg=case)
    np.testing.assert_allclose(
      ops.delta_weight(w).T, data[f"{case}/delta_out_in"], rtol=1e-5, atol=1e-7, err_msg=case
    )
    # Kernel gradient of <y, g>; PEFT's kernel gradient is right (its input gradient is not).
    grad = maybe_jit(jax.grad(lambda w: jnp.sum(ops.block_circulant_matmul(x, w) * g)))(w)
    np.testing.assert_allclose(
      grad, data[f"{case}/kernel_grad"], rtol=1e-4, atol=1e-5, err_msg=case
    )


@pytest.mark.parametrize("m,n,b", [(1, 1, 1), (2, 3, 1), (2, 2, 3), (3, 2, 5), (1, 2, 8)])
def test_gradients_match_dense_and_finite_differences(m, n, b):
  rng = np.random.default_rng(2)
  w = rng.normal(size=(m, n, b))
  x = rng.normal(size=(4, n * b))
  g = rng.normal(size=(4, m * b))
  f = lambda x, w: jnp.sum(ops.block_circulant_matmul(x, w) * g)
  gx, gw = jax.grad(f, argnums=(0, 1))(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
  # Dense reference: y = x @ D.T, so dL/dx = g @ D; dL/dw by the chain rule through D's entries.
  D = dense_reference(w)
  np.testing.assert_allclose(gx, g @ D, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gw, kernel_grad_reference(x, w, g), rtol=1e-4, atol=1e-5)
  # Central finite differences in float64 numpy on the dense form, one random direction each.
  eps = 1e-4
  loss = lambda x, w: float(np.sum((x @ dense_reference(w).T) * g))
  dx, dw = rng.normal(size=x.shape), rng.normal(size=w.shape)
  fd_x = (loss(x + eps * dx, w) - loss(x - eps * dx, w)) / (2 * eps)
  fd_w = (loss(x, w + eps * dw) - loss(x, w - eps * dw)) / (2 * eps)
  np.testing.assert_allclose(np.sum(np.asarray(gx) * dx), fd_x, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(np.sum(np.asarray(gw) * dw), fd_w, rtol=1e-3, atol=1e-4)


def test_input_gradient_is_not_peft_handwritten_formula():
  # PEFT's backward uses w[(c + r) mod b] for the input gradient; ours must be the transpose of
  # the forward map, which differs from PEFT's for b >= 3.
  rng = np.random.default_rng(3)
  w = rng.normal(size=(1, 1, 3)).astype(np.float32)
  g = rng.normal(size=(1, 3)).astype(np.float32)
  gx = jax.grad(lambda x: jnp.sum(ops.block_circulant_matmul(x, jnp.asarray(w)) * g))(
    jnp.zeros((1, 3), jnp.float32)
  )
  wrong = np.zeros((3, 3))
  for r in range(3):
    for c in range(3):
      wrong[r, c] = w[0, 0, (c + r) % 3] / 3
  np.testing.assert_allclose(gx, g @ dense_reference(w), rtol=1e-5, atol=1e-6)
  assert not np.allclose(gx, g @ wrong, atol=1e-3)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_input_computes_in_float32(dtype):
  rng = np.random.default_rng(4)
  w = rng.normal(size=(2, 2, 8)).astype(np.float32)
  x = rng.normal(size=(5, 16)).astype(np.float32)
  xl = jnp.asarray(x, dtype)
  y = ops.block_circulant_matmul(xl, jnp.asarray(w))
  assert y.dtype == dtype
  ref = np.asarray(xl, np.float64) @ dense_reference(w).T
  # Only the final cast rounds: error within half an ulp of the low-precision output.
  np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2**-7, atol=1e-3)


def test_shape_mismatch_names_both_shapes():
  with pytest.raises(ValueError, match=r"12 features.*\(2, 2, 4\).*n\*b = 8"):
    ops.block_circulant_matmul(jnp.ones((3, 12)), jnp.ones((2, 2, 4)))


@pytest.mark.parametrize("scheme", [True, False, "xavier_uniform", "kaiming_uniform", "gaussian"])
def test_init_schemes_follow_peft(scheme):
  shape = (24, 8, 32)  # d_out = 768, d_in = 256
  w = np.asarray(ops.init(jax.random.key(0), shape, scheme))
  assert w.shape == shape and w.dtype == np.float32
  d_in, d_out = 256, 768
  if scheme is True:
    assert not w.any()
    return
  if scheme == "gaussian":
    assert abs(w.mean()) < 0.02 and abs(w.std() - 1) < 0.02
    return
  bound = (
    np.sqrt(3) * np.sqrt(2 / (d_in + d_out))
    if scheme in (False, "xavier_uniform")
    else 1 / np.sqrt(d_in)
  )
  assert np.abs(w).max() <= bound
  # Uniform on [-a, a]: max near a and std a / sqrt(3).
  assert np.abs(w).max() > 0.99 * bound
  np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.02)


def test_init_rejects_unknown_scheme():
  with pytest.raises(ValueError, match="init_weights='orthogonal'"):
    ops.init(jax.random.key(0), (1, 1, 4), "orthogonal")


def test_bad_kernels_and_inputs_are_clear_errors():
  with pytest.raises(
    ValueError,
    match=r"delta_weight: a C3A kernel has shape \(d_out // b, "
    r"d_in // b, b\), got \(4, 4\)",
  ):
    ops.delta_weight(jnp.ones((4, 4)))
  with pytest.raises(ValueError, match=r"init: .* got \(2, 0, 4\)"):
    ops.init(jax.random.key(0), (2, 0, 4), True)
  with pytest.raises(TypeError, match="x must be floating point, got int32"):
    ops.block_circulant_matmul(jnp.ones((2, 8), jnp.int32), jnp.ones((2, 2, 4)))


def test_float64_inputs_compute_in_float64_under_x64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(5, 8)), rng.normal(size=(3, 2, 4))
    want = x @ dense_reference(w).T  # float64 numpy
    for strategy in ops.STRATEGIES:
      y = ops.block_circulant_matmul(jnp.asarray(x), jnp.asarray(w), strategy=strategy)
      assert y.dtype == jnp.float64, strategy
      np.testing.assert_allclose(y, want, atol=1e-12, err_msg=strategy)
    np.testing.assert_allclose(ops.delta_weight(jnp.asarray(w)), dense_reference(w).T, atol=1e-15)
    # float32 in x64 mode stays float32, as without it.
    y32 = ops.block_circulant_matmul(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    assert y32.dtype == jnp.float32
