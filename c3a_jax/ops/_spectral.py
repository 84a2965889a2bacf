"""What the DFT-as-matmul paths share: DFT rows, irfft weights, the kernel spectrum, ordering.

A real DFT of length ``b`` keeps ``F = b // 2 + 1`` frequencies; its rows are the cosine and
minus-sine halves below. With irfft's weights and the ``1 / (b * d_in)`` scales folded into the
kernel spectrum, the inverse DFT is the transpose of the forward one, so a forward pass and its
backward pass use the same two matrices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.cache
def dft_halves(b: int) -> tuple[np.ndarray, np.ndarray]:
  """(F, b) cosine and minus-sine rows: ``[cos; -sin] @ x`` is the real/imaginary rfft of x.

  The forward transform of the DFT-as-matmul paths (``"freq_major"``, the Pallas kernel): a
  ``(b, b)`` transform on the matrix units, where a TPU's FFT is slow.

  Example:
    >>> import numpy as np
    >>> from c3a_jax import ops
    >>> cos, sin = ops.dft_halves(4)
    >>> x = np.array([1.0, 2.0, 0.0, -1.0])
    >>> bool(np.allclose(cos @ x + 1j * (sin @ x), np.fft.rfft(x)))
    True
  """
  angle = 2 * np.pi * np.outer(np.arange(b // 2 + 1), np.arange(b)) / b
  return np.cos(angle).astype(np.float32), (-np.sin(angle)).astype(np.float32)


def irfft_weights(b: int) -> np.ndarray:
  """(F,) how often each rfft frequency counts in irfft: 1 for 0 (and b / 2 for even b), else 2."""
  weight = np.full(b // 2 + 1, 2.0)
  weight[0] = 1.0
  if b % 2 == 0:
    weight[-1] = 1.0
  return weight


def kernel_spectrum(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(m, n, F) real and imaginary parts of rfft(w) / d_in, times irfft's weights (1 or 2) / b.

  With these weights folded in, the inverse DFT is the transpose of :func:`dft_halves`: with
  ``X = [cos; -sin] @ x`` per input block, the product's output block ``i`` is
  ``cos.T @ Re(sum_j conj(K[i, j]) X_j) + sin.T @ Im(...)``: the C3A product in matmuls.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from c3a_jax import ops
    >>> w = jax.random.normal(jax.random.key(0), (1, 1, 4))   # one block: d_in = b = 4
    >>> x = jnp.array([1.0, 2.0, 0.0, -1.0])
    >>> (cos, sin), (kr, ki) = ops.dft_halves(4), ops.kernel_spectrum(w)
    >>> xr, xi = cos @ x, sin @ x
    >>> y = cos.T @ (kr[0, 0] * xr + ki[0, 0] * xi) + sin.T @ (kr[0, 0] * xi - ki[0, 0] * xr)
    >>> bool(jnp.allclose(y, x @ ops.delta_weight(w), atol=1e-5))
    True
  """
  _, n, b = w.shape
  wf = jnp.fft.rfft(w.astype(jnp.float32), axis=-1) * jnp.asarray(
    irfft_weights(b) / (b * n * b), jnp.float32
  )
  return wf.real, wf.imag


def conj_product_parts(c: jax.Array, n: int, m: int) -> tuple[jax.Array, jax.Array]:
  """Real and imaginary ``(F, n, m)`` parts of ``sum_t conj(G) X`` from
  ``c = [Re X, Im X]^T [Re G, Im G]`` of shape ``(F, 2n, 2m)``: the correlation done as one
  matmul over both parts (XLA:CPU runs four thin ones far below its matmul rate)."""
  return c[:, :n, :m] + c[:, n:, m:], c[:, n:, :m] - c[:, :n, m:]


def ordered_after(value: jax.Array, signal: jax.Array) -> jax.Array:
  """``value`` plus a zero taken from ``signal``: whatever is computed from it waits for ``signal``.

  A backward pass recomputes things (W', the spectrum of x) that depend on the forward pass
  only; left free, XLA computes every adapted layer's at the start of the backward pass and
  holds them all (optimisation barriers do not survive its CPU pipeline). Tied to the layer's
  incoming gradient they are built one layer at a time. XLA keeps the float product with zero;
  it can only turn a result NaN where ``signal`` already holds a NaN or an infinity.
  """
  return value + (0.0 * jnp.sum(signal.ravel()[:1])).astype(value.dtype)
