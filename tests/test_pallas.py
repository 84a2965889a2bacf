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
# runs one shape (odd b, several blocks each way) and the token tiles below.
SHAPES = [
  pytest.param(*s, marks=[pytest.mark.integration] * (s != (2, 3, 5)))
  for s in [
    (1, 1, 1),
    (2, 3, 5),
    (1, 1, 2),
    (2, 2, 16),
    (2, 3, 33),
    (1, 2, 64),
    (3, 2, 7),
    (2, 20, 3),
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
