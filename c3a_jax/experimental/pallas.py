"""C3A as one fused Pallas kernel per pass: DFT, frequency product and inverse DFT per token tile.

Experimental: unmeasured on the GPUs and TPUs it is written for, so it is not a strategy of
:func:`c3a_jax.ops.block_circulant_matmul` and ``"auto"`` never picks it. Each program of the
grid takes a tile of tokens and keeps everything between reading ``x`` and writing ``y`` on
chip: the DFT of every input block (two matmuls with cosine and sine matrices), the product
with the kernel spectrum summed over input blocks, and the inverse DFT (the transposed
matrices, with irfft's weights folded into the kernel spectrum, as the ``"freq_major"``
strategy does). The backward pass is two more kernels: the input gradient is the same product
with the transposed kernel spectrum, and the kernel gradient is a per-tile correlation summed
over tiles outside the kernel (so no two programs write one block, as GPU grids require).

The spectrum is padded from ``b // 2 + 1`` to ``b`` frequencies so that, for a power-of-two
``b``, every block shape is a power of two (Triton's requirement on GPU). Off CPU the kernel is
compiled for the backend; on CPU it runs in Pallas's interpret mode, which is exact but slow:
it is there to test the kernel.

Example:
  >>> import jax.numpy as jnp
  >>> from c3a_jax import ops
  >>> from c3a_jax.experimental import pallas
  >>> x, w = jnp.ones((4, 8)), jnp.arange(16.0).reshape(2, 2, 4)
  >>> bool(jnp.allclose(pallas.apply(x, w), ops.block_circulant_matmul(x, w, strategy="fft"),
  ...                   atol=1e-5))
  True
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from c3a_jax.ops._spectral import dft_halves, kernel_spectrum

TOKEN_TILE = 128
"""Tokens per program: a multiple of 8 (TPU sublanes) and of 16 (GPU matmul tiles)."""


def apply(x: jax.Array, w: jax.Array, *, interpret: bool | None = None) -> jax.Array:
  """``x @ delta_weight(w)`` for float32 ``x`` of shape ``(tokens, n * b)``: ``(tokens, m * b)``.

  Args:
    x: ``(tokens, n * b)`` float32 activations.
    w: ``(m, n, b)`` C3A kernel.
    interpret: run Pallas in interpret mode; default: on CPU only.
  """
  b = w.shape[-1]
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  kr, ki = kernel_spectrum(w)
  pad = ((0, 0), (0, 0), (0, b - kr.shape[-1]))
  return _apply(x, jnp.pad(kr, pad), jnp.pad(ki, pad), interpret)


@functools.cache
def _dft(b: int) -> tuple[np.ndarray, np.ndarray]:
  """(b, b) cosine and minus-sine matrices, frequencies past b // 2 zeroed: x @ cos = Re rfft."""
  pad = ((0, b - (b // 2 + 1)), (0, 0))
  return tuple(np.pad(h, pad).T.copy() for h in dft_halves(b))


def _dot_t(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b.T without materialising the transpose."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _spectra(ref, blocks: int, cos: jax.Array, sin: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
  b = cos.shape[0]
  return [
    (
      jnp.dot(v, cos, preferred_element_type=jnp.float32),
      jnp.dot(v, sin, preferred_element_type=jnp.float32),
    )
    for v in (ref[:, j * b : (j + 1) * b] for j in range(blocks))
  ]


def _product_kernel(x_ref, kr_ref, ki_ref, cos_ref, sin_ref, y_ref, *, m: int, n: int):
  cos, sin = cos_ref[...], sin_ref[...]
  b = cos.shape[0]
  xs = _spectra(x_ref, n, cos, sin)
  for i in range(m):
    kr = [kr_ref[pl.ds(i * n + j, 1), :] for j in range(n)]
    ki = [ki_ref[pl.ds(i * n + j, 1), :] for j in range(n)]
    # (xr + i xi) (kr - i ki), summed over input blocks.
    yr = sum(xr * kr[j] + xi * ki[j] for j, (xr, xi) in enumerate(xs))
    yi = sum(xi * kr[j] - xr * ki[j] for j, (xr, xi) in enumerate(xs))
    y_ref[:, i * b : (i + 1) * b] = _dot_t(yr, cos) + _dot_t(yi, sin)


def _correlation_kernel(x_ref, g_ref, cos_ref, sin_ref, dkr_ref, dki_ref, *, m: int, n: int):
  cos, sin = cos_ref[...], sin_ref[...]
  xs, gs = _spectra(x_ref, n, cos, sin), _spectra(g_ref, m, cos, sin)
  for i, (gr, gi) in enumerate(gs):
    for j, (xr, xi) in enumerate(xs):
      row = pl.ds(i * n + j, 1)
      dkr_ref[0, row, :] = jnp.sum(xr * gr + xi * gi, axis=0, keepdims=True)
      dki_ref[0, row, :] = jnp.sum(xi * gr - xr * gi, axis=0, keepdims=True)


def _tiles(z: jax.Array) -> tuple[jax.Array, int]:
  """Pads the token axis to whole tiles (zero rows add nothing to any sum); (padded, tile)."""
  tile = min(TOKEN_TILE, -(-z.shape[0] // 8) * 8)
  return jnp.pad(z, ((0, -z.shape[0] % tile), (0, 0))), tile


def _full(shape: tuple[int, ...]) -> pl.BlockSpec:
  return pl.BlockSpec(shape, lambda t: (0,) * len(shape))


def _product(x, kr, ki, interpret):
  m, n, b = kr.shape
  xp, tile = _tiles(x)
  cos, sin = (jnp.asarray(h) for h in _dft(b))
  y = pl.pallas_call(
    functools.partial(_product_kernel, m=m, n=n),
    grid=(xp.shape[0] // tile,),
    in_specs=[
      pl.BlockSpec((tile, n * b), lambda t: (t, 0)),
      _full((m * n, b)),
      _full((m * n, b)),
      _full((b, b)),
      _full((b, b)),
    ],
    out_specs=pl.BlockSpec((tile, m * b), lambda t: (t, 0)),
    out_shape=jax.ShapeDtypeStruct((xp.shape[0], m * b), jnp.float32),
    interpret=interpret,
  )(xp, kr.reshape(m * n, b), ki.reshape(m * n, b), cos, sin)
  return y[: x.shape[0]]


def _correlation(x, g, shape, interpret):
  m, n, b = shape
  (xp, tile), (gp, _) = _tiles(x), _tiles(g)
  cos, sin = (jnp.asarray(h) for h in _dft(b))
  tiles = xp.shape[0] // tile
  part = pl.BlockSpec((1, m * n, b), lambda t: (t, 0, 0))
  dkr, dki = pl.pallas_call(
    functools.partial(_correlation_kernel, m=m, n=n),
    grid=(tiles,),
    in_specs=[
      pl.BlockSpec((tile, n * b), lambda t: (t, 0)),
      pl.BlockSpec((tile, m * b), lambda t: (t, 0)),
      _full((b, b)),
      _full((b, b)),
    ],
    out_specs=[part, part],
    out_shape=[jax.ShapeDtypeStruct((tiles, m * n, b), jnp.float32)] * 2,
    interpret=interpret,
  )(xp, gp, cos, sin)
  return dkr.sum(0).reshape(shape), dki.sum(0).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _apply(x, kr, ki, interpret):
  return _product(x, kr, ki, interpret)


def _apply_fwd(x, kr, ki, interpret):
  return _product(x, kr, ki, interpret), (x, kr, ki)


def _apply_bwd(interpret, residuals, g):
  x, kr, ki = residuals
  # The input gradient is the forward map with the conjugate-transposed kernel spectrum.
  dx = _product(g, kr.transpose(1, 0, 2), -ki.transpose(1, 0, 2), interpret)
  dkr, dki = _correlation(x, g, kr.shape, interpret)
  return dx, dkr, dki


_apply.defvjp(_apply_fwd, _apply_bwd)
