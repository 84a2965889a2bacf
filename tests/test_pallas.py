"""c3a_jax.experimental.pallas (interpret mode on CPU) against the dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from c3a_jax.experimental import pallas
from tests.reference import dense_reference, kernel_grad_reference

# Ops alone: at the backend's default matmul precision, which C3A's own precision overrides.
pytestmark = pytest.mark.backend_precision

# Interpret mode runs the kernel op by op, unrolled over block pairs: slow. The default tier
# runs two shapes: an odd b with several blocks each way, and a b that is padded (300 -> 512)
# and taken in frequency chunks.
SHAPES = [
  pytest.param(*s, marks=[pytest.mark.integration] * (s not in {(2, 3, 5), (2, 1, 300)}))
  for s in [
    (1, 1, 1),
    (2, 3, 5),
    (1, 1, 2),
    (2, 2, 16),
    (2, 3, 33),
    (1, 2, 64),
    (3, 2, 7),
    (2, 20, 3),
    (1, 1, 256),
    (2, 1, 300),
    (1, 1, 1024),
  ]
]


def _check(x, w, g):
  y, vjp = jax.vjp(lambda x, w: pallas.apply(x, w, interpret=True), jnp.asarray(x), jnp.asarray(w))
  gx, gw = vjp(jnp.asarray(g))
  np.testing.assert_allclose(y, x @ dense_reference(w).T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx, g @ dense_reference(w), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gw, kernel_grad_reference(x, w, g), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m,n,b", SHAPES)
def test_values_and_gradients_match_dense_reference(m, n, b):
  rng = np.random.default_rng(0)
  w = rng.normal(size=(m, n, b)).astype(np.float32)
  _check(
    rng.normal(size=(6, n * b)).astype(np.float32),
    w,
    rng.normal(size=(6, m * b)).astype(np.float32),
  )


@pytest.mark.integration
def test_several_token_tiles():
  """Several token tiles, the last one padded: the per-tile kernel gradients must add up."""
  rng = np.random.default_rng(3)
  w = rng.normal(size=(2, 3, 8)).astype(np.float32)
  x = rng.normal(size=(2 * pallas.TOKEN_TILE + 5, 24)).astype(np.float32)
  _check(x, w, rng.normal(size=(x.shape[0], 16)).astype(np.float32))


def test_layouts_fit_triton_and_shared_memory():
  """Every block size pads to matmul operands with power-of-two sides of at least 16 and at
  most 64 KiB of float32, which is what the GPU kernel compiles to (Triton's rules, Hopper's
  227 KiB of shared memory)."""
  for b in range(1, pallas.MAX_BLOCK + 1):
    layout = pallas._Layout.of(b)
    sides = (layout.bp, layout.tile, layout.chunk)
    assert all(s >= 16 and s & (s - 1) == 0 for s in sides), (b, layout)
    assert layout.bp >= b and layout.bp % layout.chunk == 0
    assert max(layout.tile, layout.chunk) * layout.bp * 4 <= 64 * 1024, (b, layout)


def test_low_precision_inputs_come_back_in_their_dtype():
  rng = np.random.default_rng(1)
  w = rng.normal(size=(2, 2, 8)).astype(np.float32)
  x = jnp.asarray(rng.normal(size=(5, 16)), jnp.bfloat16)
  g = jnp.asarray(rng.normal(size=(5, 16)), jnp.bfloat16)
  y, vjp = jax.vjp(lambda x, w: pallas.apply(x, w, interpret=True), x, jnp.asarray(w))
  gx, gw = vjp(g)
  assert y.dtype == gx.dtype == jnp.bfloat16 and gw.dtype == jnp.float32
  xf, gf = np.asarray(x, np.float64), np.asarray(g, np.float64)
  np.testing.assert_allclose(
    np.asarray(y, np.float64), xf @ dense_reference(w).T, rtol=2**-7, atol=2**-7
  )
  np.testing.assert_allclose(gw, kernel_grad_reference(xf, w, gf), rtol=1e-4, atol=1e-4)


def test_what_the_gpu_kernel_cannot_take_is_refused_by_name(monkeypatch):
  x, w = jnp.ones((4, 2048)), jnp.ones((1, 1, 2048))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(ValueError, match=r"b=2048 pads to 2048, above the 1024 .*strategy='fft'"):
    pallas.apply(x, w)
  with pytest.raises(ValueError, match=r"x must be \(tokens, n\*b\) = \(tokens, 2048\)"):
    pallas.apply(jnp.ones((4, 8)), w)
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  with pytest.raises(NotImplementedError, match=r"not been tested on TPU.*freq_major"):
    pallas.apply(jnp.ones((4, 8)), jnp.ones((1, 1, 8)))
