"""C3A as one fused Pallas kernel per pass: DFT, frequency product and inverse DFT per token tile.

Experimental: not yet measured to win on the GPUs it is written for, so it is not a strategy
of :func:`c3a_jax.ops.block_circulant_matmul` and ``"auto"`` never picks it
(``benchmarks/accelerator.py`` times it beside the strategies). Each program of the grid takes
a tile of tokens and keeps everything between reading ``x`` and writing ``y`` on chip: the DFT
of every input block (matmuls with cosine and sine matrices), the product with the kernel
spectrum summed over input blocks, and the inverse DFT (the transposed matrices, with irfft's
weights folded into the kernel spectrum, as the ``"freq_major"`` strategy does). The backward
pass is two more kernels: the input gradient is the same product with the transposed kernel
spectrum, and the kernel gradient is a per-tile correlation summed over tiles outside the
kernel (so no two programs write one block, as GPU grids require).

Shapes, for Triton (GPU): every array a kernel computes on has power-of-two sides of at least
16. A block of ``b`` is laid out in ``bp``, the next such power of two (zero padding: a
``b`` that is not one costs a padded copy of ``x``), and the ``b // 2 + 1`` frequencies are
padded to ``bp`` and taken in chunks. The token tile and the frequency chunk shrink as ``bp``
grows so that no matmul operand exceeds 64 KiB (shared memory holds about 227 KiB on an H100
or H200); ``bp`` up to 1024 fits, larger blocks are refused off CPU.

Precision: float32 arithmetic whatever the input dtype; on GPU the matmuls run as three TF32
passes (``DotAlgorithmPreset.TF32_TF32_F32_X3``, float32-accurate on the tensor cores; a
``HIGHEST`` float32 dot would leave them for scalar FMAs), in interpret mode at ``HIGHEST``.
TPU: refused (the kernel is written for Triton's lowering and untested on Mosaic); use
``strategy="freq_major"`` there. On CPU it runs in Pallas's interpret mode, which is exact but
slow: it is there to test the kernel.

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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from c3a_jax.ops import PRECISION, dft_halves, kernel_spectrum

TOKEN_TILE = 128
"""Tokens per program at most (fewer for large blocks): a power of two, a multiple of 8 (TPU
sublanes) and of 16 (GPU matmul tiles)."""

MAX_BLOCK = 1024
"""The largest padded block ``bp`` the GPU kernel takes (its operands must fit on chip)."""

_MIN_SIDE = 16  # Triton's matmuls need sides of at least 16
_OPERAND_ELEMENTS = 2**14  # 64 KiB of float32 per matmul operand


class _Layout(NamedTuple):
  """How a kernel of block size ``b`` is laid out: padded block, token tile, frequency chunk."""

  b: int
  bp: int
  tile: int
  chunk: int

  @classmethod
  def of(cls, b: int) -> _Layout:
    bp = max(_MIN_SIDE, 1 << (b - 1).bit_length())
    side = max(_MIN_SIDE, _OPERAND_ELEMENTS // bp)
    return cls(b, bp, min(TOKEN_TILE, side), min(bp, side))


def apply(x: jax.Array, w: jax.Array, *, interpret: bool | None = None) -> jax.Array:
  """``x @ delta_weight(w)`` for ``x`` of shape ``(tokens, n * b)``: ``(tokens, m * b)``.

  Args:
    x: ``(tokens, n * b)`` activations, any float dtype (computed in float32; the result and
      the input gradient come back in ``x``'s dtype).
    w: ``(m, n, b)`` C3A kernel.
    interpret: run Pallas in interpret mode; default: on CPU only.
  """
  _, n, b = w.shape
  if x.ndim != 2 or x.shape[1] != n * b:
    raise ValueError(
      f"pallas.apply: x must be (tokens, n*b) = (tokens, {n * b}) for the C3A kernel of shape "
      f"{tuple(w.shape)} (m, n, b), got {tuple(x.shape)}"
    )
  backend = jax.default_backend()
  if interpret is None:
    interpret = backend == "cpu"
  layout = _Layout.of(b)
  if not interpret:
    if backend == "tpu":
      raise NotImplementedError(
        "c3a_jax.experimental.pallas: the fused kernel is written for Triton (GPU) and has "
        "not been tested on TPU; use c3a.intercept(strategy='freq_major') there, or "
        "interpret=True to check values"
      )
    if layout.bp > MAX_BLOCK:
      raise ValueError(
        f"pallas.apply: block size b={b} pads to {layout.bp}, above the {MAX_BLOCK} whose "
        "operands fit on chip; use c3a.intercept(strategy='fft') for such blocks"
      )
  kr, ki = kernel_spectrum(w)
  pad = ((0, 0), (0, 0), (0, layout.bp - kr.shape[-1]))
  return _apply(x, jnp.pad(kr, pad), jnp.pad(ki, pad), layout, interpret)


@functools.cache
def _dft(b: int, bp: int) -> tuple[np.ndarray, np.ndarray]:
  """(bp, bp) cosine and minus-sine matrices of a length-``b`` real DFT, zero past ``b`` rows
  and ``b // 2 + 1`` columns: ``x @ cos`` is Re rfft(x) for ``x`` zero-padded to ``bp``."""
  return tuple(np.pad(h, ((0, bp - h.shape[0]), (0, bp - b))).T.copy() for h in dft_halves(b))


def _dot(a: jax.Array, b: jax.Array, precision, *, transpose_b: bool = False) -> jax.Array:
  """``a @ b`` (``a @ b.T`` without materialising the transpose) in float32."""
  contract = (((1,), (1 if transpose_b else 0,)), ((), ()))
  return jax.lax.dot_general(
    a, b, contract, precision=precision, preferred_element_type=jnp.float32
  )


def _spectra(ref, blocks, cos, sin, bp, precision):
  """Real and imaginary spectra of each of ``blocks`` padded blocks of ``ref`` over the
  frequency chunk of ``cos`` and ``sin``."""
  out = []
  for j in range(blocks):
    v = ref[:, j * bp : (j + 1) * bp].astype(jnp.float32)
    out.append((_dot(v, cos, precision), _dot(v, sin, precision)))
  return out


def _product_kernel(x_ref, kr_ref, ki_ref, cos_ref, sin_ref, y_ref, *, m, n, layout, precision):
  bp, chunk = layout.bp, layout.chunk
  for c in range(0, layout.b // 2 + 1, chunk):  # the chunks past the last frequency are zero
    cos, sin = cos_ref[:, c : c + chunk], sin_ref[:, c : c + chunk]
    xs = _spectra(x_ref, n, cos, sin, bp, precision)
    for i in range(m):
      kr = [kr_ref[pl.ds(i * n + j, 1), c : c + chunk] for j in range(n)]
      ki = [ki_ref[pl.ds(i * n + j, 1), c : c + chunk] for j in range(n)]
      # (xr + i xi) (kr - i ki), summed over input blocks.
      yr = sum(xr * kr[j] + xi * ki[j] for j, (xr, xi) in enumerate(xs))
      yi = sum(xi * kr[j] - xr * ki[j] for j, (xr, xi) in enumerate(xs))
      part = _dot(yr, cos, precision, transpose_b=True) + _dot(yi, sin, precision, transpose_b=True)
      block = slice(i * bp, (i + 1) * bp)
      y_ref[:, block] = part if c == 0 else y_ref[:, block] + part


def _correlation_kernel(
  x_ref, g_ref, cos_ref, sin_ref, dkr_ref, dki_ref, *, m, n, layout, precision
):
  bp, chunk = layout.bp, layout.chunk
  for c in range(0, layout.b // 2 + 1, chunk):
    cos, sin = cos_ref[:, c : c + chunk], sin_ref[:, c : c + chunk]
    xs = _spectra(x_ref, n, cos, sin, bp, precision)
    gs = _spectra(g_ref, m, cos, sin, bp, precision)
    for i, (gr, gi) in enumerate(gs):
      for j, (xr, xi) in enumerate(xs):
        row = pl.ds(i * n + j, 1)
        dkr_ref[0, row, c : c + chunk] = jnp.sum(xr * gr + xi * gi, axis=0, keepdims=True)
        dki_ref[0, row, c : c + chunk] = jnp.sum(xi * gr - xr * gi, axis=0, keepdims=True)


def _tile(layout: _Layout, tokens: int) -> int:
  """The token tile: the layout's, or fewer for few tokens (still a power of two >= 16)."""
  return min(layout.tile, max(_MIN_SIDE, 1 << (tokens - 1).bit_length()))


def _padded(z: jax.Array, layout: _Layout, tile: int) -> jax.Array:
  """``(tokens, blocks * b)`` to ``(tokens', blocks * bp)``: blocks zero-padded to ``bp``,
  tokens to whole tiles (zero rows and columns add nothing to any sum)."""
  tokens = z.shape[0]
  if layout.bp != layout.b:
    z = z.reshape(tokens, -1, layout.b)
    z = jnp.pad(z, ((0, 0), (0, 0), (0, layout.bp - layout.b))).reshape(tokens, -1)
  return jnp.pad(z, ((0, -tokens % tile), (0, 0)))


def _unpadded(y: jax.Array, tokens: int, layout: _Layout) -> jax.Array:
  y = y[:tokens]
  if layout.bp == layout.b:
    return y
  return y.reshape(tokens, -1, layout.bp)[:, :, : layout.b].reshape(tokens, -1)


def _full(shape: tuple[int, ...]) -> pl.BlockSpec:
  return pl.BlockSpec(shape, lambda t: (0,) * len(shape))


def _matrices(layout: _Layout) -> list[jax.Array]:
  return [jnp.asarray(h) for h in _dft(layout.b, layout.bp)]


def _precision(interpret: bool):
  return PRECISION if interpret else jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def _product(x, kr, ki, layout, interpret):
  m, n, bp = kr.shape
  tile = _tile(layout, x.shape[0])
  xp = _padded(x, layout, tile)
  kernel = functools.partial(
    _product_kernel, m=m, n=n, layout=layout, precision=_precision(interpret)
  )
  y = pl.pallas_call(
    kernel,
    grid=(xp.shape[0] // tile,),
    in_specs=[
      pl.BlockSpec((tile, n * bp), lambda t: (t, 0)),
      _full((m * n, bp)),
      _full((m * n, bp)),
      _full((bp, bp)),
      _full((bp, bp)),
    ],
    out_specs=pl.BlockSpec((tile, m * bp), lambda t: (t, 0)),
    out_shape=jax.ShapeDtypeStruct((xp.shape[0], m * bp), jnp.float32),
    interpret=interpret,
  )(xp, kr.reshape(m * n, bp), ki.reshape(m * n, bp), *_matrices(layout))
  return _unpadded(y, x.shape[0], layout).astype(x.dtype)


def _correlation(x, g, shape, layout, interpret):
  m, n, bp = shape
  tile = _tile(layout, x.shape[0])
  xp, gp = _padded(x, layout, tile), _padded(g, layout, tile)
  tiles = xp.shape[0] // tile
  part = pl.BlockSpec((1, m * n, bp), lambda t: (t, 0, 0))
  kernel = functools.partial(
    _correlation_kernel, m=m, n=n, layout=layout, precision=_precision(interpret)
  )
  dkr, dki = pl.pallas_call(
    kernel,
    grid=(tiles,),
    in_specs=[
      pl.BlockSpec((tile, n * bp), lambda t: (t, 0)),
      pl.BlockSpec((tile, m * bp), lambda t: (t, 0)),
      _full((bp, bp)),
      _full((bp, bp)),
    ],
    out_specs=[part, part],
    out_shape=[jax.ShapeDtypeStruct((tiles, m * n, bp), jnp.float32)] * 2,
    interpret=interpret,
  )(xp, gp, *_matrices(layout))
  return dkr.sum(0).reshape(shape), dki.sum(0).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _apply(x, kr, ki, layout, interpret):
  return _product(x, kr, ki, layout, interpret)


def _apply_fwd(x, kr, ki, layout, interpret):
  return _product(x, kr, ki, layout, interpret), (x, kr, ki)


def _apply_bwd(layout, interpret, residuals, g):
  x, kr, ki = residuals
  # The input gradient is the forward map with the conjugate-transposed kernel spectrum.
  dx = _product(g, kr.transpose(1, 0, 2), -ki.transpose(1, 0, 2), layout, interpret)
  dkr, dki = _correlation(x, g, kr.shape, layout, interpret)
  return dx.astype(x.dtype), dkr, dki


_apply.defvjp(_apply_fwd, _apply_bwd)
