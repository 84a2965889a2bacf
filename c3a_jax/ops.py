"""The C3A math: a block-circulant weight change applied with FFTs. No Flax here.

A C3A kernel ``w`` of shape ``(m, n, b)`` stands for the ``(m*b, n*b)`` (PyTorch ``(out, in)``)
matrix whose ``(i, j)`` block is circulant with first row ``w[i, j]``::

    delta[i*b + r, j*b + c] = w[i, j, (c - r) mod b] / d_in        d_in = n * b

The ``1 / d_in`` scale is PEFT's; keeping it makes adapters interchangeable with PEFT.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from c3a_jax import ops
  >>> w = jax.random.normal(jax.random.key(0), (3, 2, 4))   # d_out = 12, d_in = 8
  >>> x = jnp.ones((5, 8))
  >>> y = ops.block_circulant_matmul(x, w)
  >>> bool(jnp.allclose(y, x @ ops.delta_weight(w), atol=1e-5))
  True
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from c3a_jax import freq_major, merged, pallas

InitWeights = Union[bool, Literal["xavier_uniform", "kaiming_uniform", "gaussian"]]
INIT_WEIGHTS = (True, False, "xavier_uniform", "kaiming_uniform", "gaussian")


STRATEGIES = ("auto", "fft", "rfft", "dft", "freq_major", "pallas", "dense", "merged")
"""How :func:`block_circulant_matmul` computes the same product (see its docstring)."""
Strategy = Literal["auto", "fft", "rfft", "dft", "freq_major", "pallas", "dense", "merged"]


def block_circulant_matmul(x: jax.Array, w: jax.Array, *, strategy: Strategy = "auto"
                           ) -> jax.Array:
  """Applies the C3A weight change to ``x``: ``x @ delta_weight(w)`` computed with FFTs.

  Every strategy computes the same function (PEFT's math, float32 inside) and the same
  gradients; they differ in speed and in what the backward pass keeps:

  * ``"fft"``: rfft, complex einsum, irfft, differentiated by autodiff. The plain reference.
  * ``"rfft"``: rfft / irfft with the frequency product written in real arithmetic (an
    unrolled sum over blocks when there are few), and a custom VJP that keeps only ``x``
    (its backward recomputes the spectrum; the kernel gradient is a correlation summed
    over tokens).
  * ``"dft"``: as ``"rfft"`` but each transform is a matmul with a ``(b, b + 2)`` real DFT
    matrix; it feeds the matrix units of GPUs and TPUs (on CPU it measures about as fast as
    ``"fft"`` for ``b <= 128`` and slower beyond).
  * ``"freq_major"``: transforms as DFT matmuls whose output is frequency-major, so that the
    frequency product and the kernel gradient are matmuls batched over frequencies
    (:mod:`c3a_jax.freq_major`); the fastest on CPU for many large blocks (Llama widths).
  * ``"pallas"``: one fused Pallas kernel per pass (DFT, product and inverse DFT per token
    tile; :mod:`c3a_jax.pallas`), for GPU/TPU. On CPU it runs in interpret mode: exact but
    slow, for testing; ``"auto"`` does not pick it.
  * ``"dense"``: builds the dense ``(d_in, d_out)`` delta and multiplies; cheapest for a
    handful of tokens or tiny blocks (``b <= 8``), where FFTs are all overhead.
  * ``"merged"``: the forward as ``"dense"``, the kernel gradient as a spectral correlation
    (:mod:`c3a_jax.merged`). Its point is inside an adapted float32 Dense, where
    :func:`c3a_jax.intercept` folds the delta into the frozen kernel (``x @ (W + delta)``), so
    that the forward and the input gradient ride on the base layer's own matmuls; ``"auto"``
    picks it there.
  * ``"auto"`` (default): picks one of the above from the block size, the number of blocks,
    the token count and the backend (:func:`choose_strategy`); the choice is a pure function
    of the shapes, so a given shape always takes the same path.

  Args:
    x: ``(..., n*b)`` activations, any float dtype and any number of leading axes.
    w: ``(m, n, b)`` C3A kernel.
    strategy: one of :data:`STRATEGIES`.

  Returns:
    ``(..., m*b)`` in ``x``'s dtype. The arithmetic runs in float32 whatever the input dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> from c3a_jax import ops
    >>> x, w = jnp.ones((4, 8)), jnp.ones((2, 2, 4))
    >>> bool(jnp.allclose(ops.block_circulant_matmul(x, w, strategy="dft"),
    ...                   ops.block_circulant_matmul(x, w, strategy="fft"), atol=1e-6))
    True
  """
  m, n, b = _kernel_shape(w, "block_circulant_matmul")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"block_circulant_matmul: x must be floating point, got {x.dtype}")
  if x.shape[-1] != n * b:
    raise ValueError(
        f"block_circulant_matmul: x has {x.shape[-1]} features but the C3A kernel of shape "
        f"{tuple(w.shape)} (m, n, b) expects n*b = {n * b}")
  if strategy == "auto":
    strategy = choose_strategy(x.shape, w.shape)
  elif strategy not in STRATEGIES:
    raise ValueError(f"block_circulant_matmul: strategy={strategy!r} is not one of {STRATEGIES}")
  lead = x.shape[:-1]
  x2 = x.reshape(-1, n * b)
  if strategy == "fft":
    y = _fft_apply(x2, w)
  elif strategy == "dense":
    y = x2.astype(jnp.float32) @ delta_weight(w)
  elif strategy == "freq_major":
    y = freq_major.apply(x2.astype(jnp.float32), w)
  elif strategy == "pallas":
    y = pallas.apply(x2.astype(jnp.float32), w)
  elif strategy == "merged":
    y = merged.dense(x2, w)
  else:
    y = _spectral(x2, w, strategy)
  return y.reshape(*lead, m * b).astype(x.dtype)


def choose_strategy(x_shape: tuple[int, ...], w_shape: tuple[int, int, int],
                    backend: Optional[str] = None, *, with_base: bool = False) -> str:
  """The strategy ``"auto"`` uses for activations of ``x_shape`` and a kernel of ``w_shape``.

  Deterministic: a function of the shapes, the backend (default: JAX's default backend) and
  ``with_base`` only. The thresholds come from ``benchmarks/layer.py`` (see
  benchmarks/RESULTS.md).

  ``with_base=True`` says the delta goes into a float32 Dense whose kernel can absorb it (the
  interceptor's case): then ``"merged"``, which leaves the adapter only the delta's build
  (two passes over a ``(d_in, d_out)`` matrix) and its kernel gradient, unless the tokens are
  too few to pay for the build: fewer than ``d_in * d_out / (2 * (d_in + d_out))``.

  Example:
    >>> from c3a_jax import ops
    >>> ops.choose_strategy((8, 128, 768), (6, 6, 128), backend="cpu")
    'fft'
    >>> ops.choose_strategy((2048, 4096), (16, 16, 256), backend="cpu")
    'freq_major'
    >>> ops.choose_strategy((2048, 4096), (16, 16, 256), with_base=True)
    'merged'
  """
  m, n, b = _kernel_shape(w_shape, "choose_strategy")
  tokens = math.prod(x_shape[:-1])
  d_in, d_out = n * b, m * b
  if with_base and 2 * tokens * (d_in + d_out) >= d_in * d_out:
    return "merged"
  backend = backend or jax.default_backend()
  if b <= _DENSE_MAX_B or tokens <= _DENSE_MAX_TOKENS:
    return "dense"
  if backend != "cpu":
    # Not measured here (no accelerator in this project's CI): the DFT matmul feeds the matrix
    # units up to moderate blocks, cuFFT / the TPU FFT beyond.
    return "dft" if b <= _DFT_MAX_B_ACCEL else "fft"
  # CPU (benchmarks/RESULTS.md): with many blocks the batched frequency-major matmuls win,
  # until b is so large that the DFT-as-matmul costs more than an FFT; with few blocks the
  # plain path is as fast as the others at the model level, and the real-valued custom-VJP
  # path wins for large blocks.
  if b <= _FREQ_MAJOR_MAX_B_CPU and max(m, n) >= _FREQ_MAJOR_MIN_BLOCKS:
    return "freq_major"
  if b >= _RFFT_MIN_B_CPU and m * n >= 4 and max(m, n) <= _UNROLL_MAX_BLOCKS:
    return "rfft"
  return "fft"


# "auto" thresholds, from benchmarks/layer.py on a 2-core CPU (see benchmarks/RESULTS.md).
_DENSE_MAX_B = 8
_DENSE_MAX_TOKENS = 16
_RFFT_MIN_B_CPU = 256
_FREQ_MAJOR_MAX_B_CPU = 256
_FREQ_MAJOR_MIN_BLOCKS = 16
_DFT_MAX_B_ACCEL = 256
# Above this many blocks the frequency product runs as dot_generals, not an unrolled loop.
_UNROLL_MAX_BLOCKS = 16


def _fft_apply(x: jax.Array, w: jax.Array) -> jax.Array:
  m, n, b = w.shape
  xf = jnp.fft.rfft(x.astype(jnp.float32).reshape(-1, n, b), axis=-1)
  # The 1/d_in scale goes on the small kernel spectrum, not the (tokens, d_out) output.
  wf = jnp.conj(jnp.fft.rfft(w.astype(jnp.float32), axis=-1)) / (n * b)
  yf = jnp.einsum("tjf,ijf->tif", xf, wf)
  return jnp.fft.irfft(yf, n=b, axis=-1).reshape(-1, m * b)


# Real-valued spectral path. A spectrum is packed as [Re | Im] along the last axis, (..., 2F)
# with F = b // 2 + 1. The forward is Y_i = sum_j X_j * conj(W_ij); its transpose (the input
# gradient) is dX_j = sum_i G_i * W_ij; the kernel gradient is irfft(sum_t conj(G_i) X_j) / d_in.


@functools.lru_cache(maxsize=None)
def _dft_matrices(b: int) -> tuple[np.ndarray, np.ndarray]:
  cos, sin = freq_major.dft_halves(b)  # (F, b) each
  forward = np.concatenate([cos, sin], 0).T  # x @ forward = [Re|Im] rfft(x)
  inverse = np.concatenate([cos, sin], 0) * np.tile(freq_major.irfft_weights(b), 2)[:, None] / b
  return forward, inverse.astype(np.float32)  # inverse: irfft as a matmul


def _to_spectrum(blocks: jax.Array, how: str) -> jax.Array:
  b = blocks.shape[-1]
  if how == "dft":
    return blocks @ jnp.asarray(_dft_matrices(b)[0])
  s = jnp.fft.rfft(blocks, axis=-1)
  return jnp.concatenate([s.real, s.imag], -1)


def _from_spectrum(s: jax.Array, b: int, how: str) -> jax.Array:
  if how == "dft":
    return s @ jnp.asarray(_dft_matrices(b)[1])
  f = b // 2 + 1
  return jnp.fft.irfft(jax.lax.complex(s[..., :f], s[..., f:]), n=b, axis=-1)


def _mix(s: jax.Array, wr: jax.Array, wi: jax.Array) -> jax.Array:
  """(T, n, 2F) spectra times an (m, n, F) spectrum (wr + i wi), summed over n: (T, m, 2F)."""
  f = wr.shape[-1]
  sr, si = s[..., :f], s[..., f:]
  n = wr.shape[1]
  if n <= _UNROLL_MAX_BLOCKS:
    # A fused loop over the few blocks beats a batched dot with tiny inner dimensions.
    yr = sum(sr[:, j:j + 1] * wr[:, j] - si[:, j:j + 1] * wi[:, j] for j in range(n))
    yi = sum(si[:, j:j + 1] * wr[:, j] + sr[:, j:j + 1] * wi[:, j] for j in range(n))
  else:
    yr = jnp.einsum("tjf,ijf->tif", sr, wr) - jnp.einsum("tjf,ijf->tif", si, wi)
    yi = jnp.einsum("tjf,ijf->tif", si, wr) + jnp.einsum("tjf,ijf->tif", sr, wi)
  return jnp.concatenate([yr, yi], -1)


def _correlate(g: jax.Array, s: jax.Array) -> jax.Array:
  """sum_t g[t, i, :] * s[t, j, :] -> (m, n, 2F): a dot_general batched over frequency.

  (A fused multiply-reduce was tried: XLA:CPU materialises the broadcast product, which costs
  both time and a (tokens/k, m, n, 2F) buffer per layer in the training step.)
  """
  return jnp.einsum("tif,tjf->ijf", g, s)


def _kernel_spectrum(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  m, n, b = w.shape
  wf = jnp.fft.rfft(w.astype(jnp.float32), axis=-1) / (n * b)
  return wf.real, wf.imag


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _spectral(x: jax.Array, w: jax.Array, how: str) -> jax.Array:
  return _spectral_fwd(x, w, how)[0]


def _spectral_fwd(x, w, how):
  m, n, b = w.shape
  wr, wi = _kernel_spectrum(w)
  s = _to_spectrum(x.astype(jnp.float32).reshape(-1, n, b), how)
  y = _from_spectrum(_mix(s, wr, -wi), b, how).reshape(-1, m * b)
  return y, (x, w)  # keeps x only: the spectrum is recomputed in the backward pass


def _spectral_bwd(how, residuals, g):
  x, w = residuals
  m, n, b = w.shape
  f = b // 2 + 1
  wr, wi = _kernel_spectrum(w)
  gs = _to_spectrum(g.astype(jnp.float32).reshape(-1, m, b), how)
  dx = _from_spectrum(_mix(gs, wr.transpose(1, 0, 2), wi.transpose(1, 0, 2)), b, how)
  xs = _to_spectrum(x.astype(jnp.float32).reshape(-1, n, b), how)
  xs_swapped = jnp.concatenate([xs[..., f:], xs[..., :f]], -1)
  p, q = _correlate(gs, xs), _correlate(gs, xs_swapped)
  # conj(G) X = (Gr Xr + Gi Xi) + i (Gr Xi - Gi Xr)
  corr = jax.lax.complex(p[..., :f] + p[..., f:], q[..., :f] - q[..., f:])
  dw = jnp.fft.irfft(corr, n=b, axis=-1) / (n * b)
  return dx.reshape(x.shape).astype(x.dtype), dw.astype(w.dtype)


_spectral.defvjp(_spectral_fwd, _spectral_bwd)


def delta_weight(w: jax.Array) -> jax.Array:
  """The dense weight change of C3A kernel ``w`` in Flax ``(d_in, d_out)`` layout, float32.

  ``delta_weight(w).T`` is PEFT's ``get_delta_weight`` (PyTorch ``(out, in)`` layout).
  """
  m, n, b = _kernel_shape(w, "delta_weight")
  r = jnp.arange(b)
  # blocks[i, j, r, c] = w[i, j, (c - r) mod b]: each row is the previous one shifted right.
  # (A (b, b) index array: one gather straight into (d_in, d_out) would index with a
  # (d_in * d_out, 3) array, three times the size of the result.)
  blocks = w.astype(jnp.float32)[:, :, (r[None, :] - r[:, None]) % b]
  # (i, j, r, c) -> rows j*b + c (input), columns i*b + r (output).
  return blocks.transpose(1, 3, 0, 2).reshape(n * b, m * b) / (n * b)


def init(key: jax.Array, shape: tuple[int, int, int], init_weights: InitWeights) -> jax.Array:
  """A float32 C3A kernel of ``shape = (d_out // b, d_in // b, b)``, initialised as PEFT does.

  ``True``: zeros (a no-op adapter). ``"xavier_uniform"`` or ``False``: U(-a, a) with
  ``a = sqrt(3) * sqrt(2 / (d_in + d_out))`` over the full layer's fans.
  ``"kaiming_uniform"``: U(-1/sqrt(d_in), 1/sqrt(d_in)). ``"gaussian"``: N(0, 1).
  """
  m, n, b = _kernel_shape(shape, "init")
  d_in, d_out = n * b, m * b
  # `is` checks: True == 1 and False == 0 would otherwise let integers through.
  if init_weights is True:
    return jnp.zeros(shape, jnp.float32)
  if init_weights is False or init_weights == "xavier_uniform":
    a = math.sqrt(3.0) * math.sqrt(2.0 / (d_in + d_out))
  elif init_weights == "kaiming_uniform":
    a = 1.0 / math.sqrt(d_in)
  elif init_weights == "gaussian":
    return jax.random.normal(key, shape, jnp.float32)
  else:
    raise ValueError(f"init_weights={init_weights!r} is not one of {INIT_WEIGHTS}")
  return jax.random.uniform(key, shape, jnp.float32, -a, a)


def _kernel_shape(w: Any, where: str) -> tuple[int, int, int]:
  shape = tuple(getattr(w, "shape", w))
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"{where}: a C3A kernel has shape (d_out // b, d_in // b, b), got {shape}")
  return shape
