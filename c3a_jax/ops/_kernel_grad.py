"""C3A's kernel gradient alone: the spectra of ``x`` and ``g`` correlated, summed over tokens.

What the fold (:func:`c3a_jax.ops.fold`) pays for its adapter, besides building ``W + delta``:
its forward and input gradient ride on the base layer's matmuls. The gradient of
``sum(g * (x @ delta_weight(w)))`` with respect to ``w`` is, per frequency ``f`` of the
blocks' real DFT, ``sum_t conj(G[t, i, f]) X[t, j, f]``: two transforms of ``tokens x d``
arrays and a thin correlation (``n`` and ``m`` are a few blocks) over all tokens.

On CPU both are memory-bound when done over whole arrays (each spectrum is written out and
read back, and the correlation runs far below matmul rate with ``tokens`` as its only long
axis), so there the tokens go through in chunks that stay in cache: each chunk's ``rfft``
spectra are correlated at once and summed (measured in benchmarks/RESULTS.md, section 5).
Elsewhere the whole-array forms stay: frequency-major DFT matmuls up to ``b = 256`` (matrix
units; TPUs' FFT is slow), FFTs beyond.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from c3a_jax.ops import _fft, _freq_major
from c3a_jax.ops._kernel import PRECISION
from c3a_jax.ops._spectral import conj_product_parts, ordered_after

# Above this block size the whole-array kernel gradient's transforms are FFTs, below it DFT
# matmuls (a (b, b) DFT matmul per block costs more than an FFT for large b).
_DFT_MAX_B = 256

# Bytes of float32 activations per chunk on CPU, so that a chunk's x, g and their spectra stay
# in cache (sizes on either side of it measured alike, benchmarks/RESULTS.md section 5); at most
# _MAX_CHUNKS chunks, unrolled, which bounds what the compiler sees.
_CHUNK_BYTES = 2**20
_MAX_CHUNKS = 16


def kernel_grad(
  x: jax.Array, g: jax.Array, w: jax.Array, *, backend: str | None = None
) -> jax.Array:
  """The gradient of ``sum(g * block_circulant_matmul(x, w))`` with respect to ``w``.

  Args:
    x: ``(tokens, n * b)`` activations, any float dtype (computed in float32, cast a chunk
      at a time).
    g: ``(tokens, m * b)`` cotangent of the product.
    w: ``(m, n, b)`` C3A kernel.
    backend: where it runs (default: JAX's default backend); CPU takes the chunked path.

  Returns:
    ``(m, n, b)`` float32.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from c3a_jax import ops
    >>> from c3a_jax.ops._kernel_grad import kernel_grad
    >>> x, g = jnp.ones((5, 8)), jnp.arange(60.0).reshape(5, 12)
    >>> w = jnp.zeros((3, 2, 4))
    >>> autodiff = jax.grad(lambda w: jnp.sum(g * ops.block_circulant_matmul(x, w)))(w)
    >>> bool(jnp.allclose(kernel_grad(x, g, w), autodiff, rtol=1e-5))
    True
  """
  m, n, b = w.shape
  if (backend or jax.default_backend()) != "cpu":
    return _whole(x.astype(jnp.float32), g.astype(jnp.float32), w)
  c = _chunked_correlation(x, g, n, b, rows=max(1, _CHUNK_BYTES // (4 * x.shape[1])))
  return _freq_major.spectrum_grad(w, conj_product_parts(c, n, m))


def _whole(x, g, w):
  if w.shape[-1] <= _DFT_MAX_B:
    return _freq_major.kernel_grad(x, g, w)
  # Only the kernel gradient of the FFT path is used; XLA drops its forward.
  x_late = ordered_after(x, g)
  _, vjp = jax.vjp(lambda w: _fft.apply(x_late, w), w)
  return vjp(g)[0]


def _chunked_correlation(x, g, n, b, rows):
  """``(F, 2n, 2m)``: ``[Re X, Im X]^T [Re G, Im G]`` per frequency, summed over tokens,
  about ``rows`` tokens at a time."""
  tokens, m = x.shape[0], g.shape[1] // b
  chunks = max(1, min(_MAX_CHUNKS, -(-tokens // rows)))
  bounds = [tokens * k // chunks for k in range(chunks + 1)]
  total = jnp.zeros((b // 2 + 1, 2 * n, 2 * m))
  for start, stop in itertools.pairwise(bounds):
    # Each chunk waits for the sum so far: one chunk's spectra alive at a time. (A loop op
    # would need x and g whole, in its own layout: a copy of each per layer in a model.)
    xs, gs = (ordered_after(z[start:stop], total) for z in (x, g))
    total = total + jnp.einsum(
      "tjf,tif->fji", _parts(xs, n, b), _parts(gs, m, b), precision=PRECISION
    )
  return total


def _parts(z, blocks, b):
  """(rows, blocks * b) -> (rows, 2 * blocks, F): real parts of rfft over each block, then
  imaginary parts."""
  spectrum = jnp.fft.rfft(z.astype(jnp.float32).reshape(z.shape[0], blocks, b), axis=-1)
  return jnp.concatenate([spectrum.real, spectrum.imag], axis=1)
