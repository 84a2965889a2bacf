"""The ``"fft"`` strategy: rfft, a complex product summed over input blocks, irfft.

PEFT's own formulation, differentiated by autodiff: the plain reference the other strategies
are tested against, and the fold's kernel gradient for blocks too large for DFT matmuls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from c3a_jax.ops._kernel import PRECISION, compute_dtype


def apply(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x @ delta_weight(w)`` for ``x`` of shape ``(tokens, n * b)``, in float32 (float64 where
  an input is)."""
  m, n, b = w.shape
  dtype = compute_dtype(x.dtype, w.dtype)
  xf = jnp.fft.rfft(x.astype(dtype).reshape(-1, n, b), axis=-1)
  yf = jnp.einsum("tjf,ijf->tif", xf, kernel_spectrum(w, dtype), precision=PRECISION)
  return jnp.fft.irfft(yf, n=b, axis=-1).reshape(-1, m * b)


def kernel_spectrum(w: jax.Array, dtype) -> jax.Array:
  """``(..., m, n, F)``: what each input block's spectrum is multiplied by, conj(rfft(w)) /
  d_in (PEFT's product; the 1/d_in scale on the small kernel spectrum, not the output)."""
  n, b = w.shape[-2:]
  return jnp.conj(jnp.fft.rfft(w.astype(dtype), axis=-1)) / (n * b)
