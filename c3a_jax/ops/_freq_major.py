"""C3A's product with frequency-major spectra: every step a matmul, batched over frequencies.

The ``"freq_major"`` strategy of :func:`c3a_jax.ops.block_circulant_matmul`, and the kernel
gradient of the fold (:func:`c3a_jax.ops.fold`). Each block of ``x`` goes through a real DFT
written as two matmuls (cosine and sine halves), whose output comes out frequency-major,
``(F, tokens * blocks)``, with ``F = b // 2 + 1``. In that layout
the three products C3A needs are batched matmuls with the frequency as the batch axis:

* forward, per frequency ``f``: ``Y[f] = X[f] @ conj(W[f]).T`` (tokens x n times n x m);
* input gradient: the same with the transposed kernel spectrum;
* kernel gradient: ``sum_t conj(G[f, t]) X[f, t]``, a contraction over tokens that needs no
  transpose in this layout (in the blocks' own layout XLA:CPU transposes both operands).

The inverse DFT is the transpose of the forward one with the ``irfft`` weights folded into
the kernel spectrum, so the backward pass reuses the same two matrices. A custom VJP keeps
only ``x`` and the kernel spectrum; the spectrum of ``x`` is recomputed in the backward pass.

It is the DFT-as-matmul path: on accelerators whose FFT is slow (TPUs) the transforms run
on the matrix units.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from c3a_jax.ops._kernel import PRECISION
from c3a_jax.ops._spectral import conj_product_parts, dft_halves, kernel_spectrum, ordered_after


def apply(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x @ delta_weight(w)`` for float32 ``x`` of shape ``(tokens, n * b)``: ``(tokens, m * b)``."""
  return _apply(x, *_frequency_major(w))


def kernel_grad(x: jax.Array, g: jax.Array, w: jax.Array) -> jax.Array:
  """The gradient of ``sum(apply(x, w) * g)`` with respect to ``w``, without the rest.

  A correlation of the spectra of ``x`` and ``g`` summed over tokens, batched over
  frequencies; ``x``: ``(tokens, n * b)``, ``g``: ``(tokens, m * b)``, both float32.
  """
  m, n, _ = w.shape
  return spectrum_grad(w, _correlation(x, *_spectrum(g, m), n))


def spectrum_grad(w: jax.Array, parts: tuple[jax.Array, jax.Array]) -> jax.Array:
  """The gradient with respect to ``w`` from that of its frequency-major spectrum: real and
  imaginary ``(F, n, m)`` parts, e.g. a correlation ``sum_t conj(G) X``."""
  _, vjp = jax.vjp(_frequency_major, w)
  return vjp(parts)[0]


def _frequency_major(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  return tuple(part.transpose(2, 1, 0) for part in kernel_spectrum(w))


def _spectrum(z: jax.Array, blocks: int) -> tuple[jax.Array, jax.Array]:
  """(tokens, blocks * b) -> real and imaginary (F, tokens, blocks)."""
  tokens = z.shape[0]
  b = z.shape[1] // blocks
  rows = z.reshape(tokens * blocks, b)
  # Contracting both operands' last axis gives the frequency-major output without a transpose.
  return tuple(
    jnp.einsum("fs,rs->fr", jnp.asarray(h), rows, precision=PRECISION).reshape(-1, tokens, blocks)
    for h in dft_halves(b)
  )


def _unspectrum(re: jax.Array, im: jax.Array, b: int) -> jax.Array:
  """The transpose of :func:`_spectrum`: (F, tokens, blocks) real and imaginary parts to
  (tokens, blocks * b)."""
  f, tokens, _ = re.shape
  cos, sin = (jnp.asarray(h) for h in dft_halves(b))
  rows = jnp.einsum("fr,fs->rs", re.reshape(f, -1), cos, precision=PRECISION) + jnp.einsum(
    "fr,fs->rs", im.reshape(f, -1), sin, precision=PRECISION
  )
  return rows.reshape(tokens, -1)


def _mul(a: jax.Array, k: jax.Array) -> jax.Array:
  return jnp.einsum("ftj,fji->fti", a, k, precision=PRECISION)


def _correlate(a: jax.Array, g: jax.Array) -> jax.Array:
  return jnp.einsum("ftj,fti->fji", a, g, precision=PRECISION)


def _correlation(x, gr, gi, n):
  """(F, n, m) real and imaginary sum_t conj(G) X, for x (tokens, n * b) and G's spectrum."""
  xr, xi = _spectrum(ordered_after(x, gr), n)
  c = _correlate(jnp.concatenate([xr, xi], -1), jnp.concatenate([gr, gi], -1))
  return conj_product_parts(c, n, gr.shape[-1])


@jax.custom_vjp
def _apply(x: jax.Array, kr: jax.Array, ki: jax.Array) -> jax.Array:
  return _apply_fwd(x, kr, ki)[0]


def _apply_fwd(x, kr, ki):
  n = kr.shape[1]
  b = x.shape[1] // n
  xr, xi = _spectrum(x, n)
  # (xr + i xi) (kr - i ki): the product with the conjugate kernel spectrum, as PEFT's.
  y = _unspectrum(_mul(xr, kr) + _mul(xi, ki), _mul(xi, kr) - _mul(xr, ki), b)
  return y, (x, kr, ki)


def _apply_bwd(residuals, g):
  x, kr, ki = residuals
  _, n, m = kr.shape
  b = x.shape[1] // n
  # The forward is x -> S^T M S x with S the DFT rows: its transpose reuses S and M^T.
  gr, gi = _spectrum(g, m)
  krt, kit = kr.transpose(0, 2, 1), ki.transpose(0, 2, 1)
  dx = _unspectrum(_mul(gr, krt) - _mul(gi, kit), _mul(gr, kit) + _mul(gi, krt), b)
  return dx, *_correlation(x, gr, gi, n)


_apply.defvjp(_apply_fwd, _apply_bwd)
