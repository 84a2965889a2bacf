"""How the C3A product is computed: the strategy names, and the one ``"auto"`` picks."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import jax
import jax.numpy as jnp

from c3a_jax.ops._kernel import kernel_shape

Strategy = Literal["auto", "fft", "freq_major", "dense", "fold"]
STRATEGIES: tuple[Strategy, ...] = ("auto", "fft", "freq_major", "dense", "fold")
"""How :func:`block_circulant_matmul` computes the same product (see its docstring)."""

# Old names, accepted for one release with a DeprecationWarning.
_RENAMED = {"merged": "fold"}

# "auto" thresholds, from benchmarks/layer.py on a 2-core CPU (see benchmarks/RESULTS.md).
_DENSE_MAX_B = 8
_DENSE_MAX_TOKENS = 16
_FREQ_MAJOR_MAX_B = 256
_FREQ_MAJOR_MIN_BLOCKS_CPU = 16


def check_strategy(strategy: str, where: str, *, stacklevel: int = 3) -> Strategy:
  """``strategy`` if it is one of :data:`STRATEGIES` (or a deprecated name for one), else a
  ValueError naming ``where`` and the valid names.

  A deprecated name warns; ``stacklevel`` says which frame the warning names (the default:
  the caller of the function that called this one).

  Example:
    >>> from c3a_jax import ops
    >>> ops.check_strategy("fold", "intercept")
    'fold'
  """
  if strategy in _RENAMED:
    new = _RENAMED[strategy]
    warnings.warn(
      f"{where}: strategy={strategy!r} is deprecated; it is now called {new!r}",
      DeprecationWarning,
      stacklevel=stacklevel,
    )
    return new
  if strategy not in STRATEGIES:
    raise ValueError(f"{where}: strategy={strategy!r} is not one of {STRATEGIES}")
  return strategy


def can_fold(dtype: Any, backend: str | None = None) -> bool:
  """Whether a Dense computing in ``dtype`` on ``backend`` can take ``"fold"`` without rounding.

  float32 everywhere. bfloat16 and float16 on CPU only: XLA:CPU runs their matmuls as float32
  ones (it converts the operands; the results are bit-identical), so the float32 ``W + delta``
  rounds nothing the base layer does not, and costs no more. On accelerators a low-precision
  matmul is native: ``W + delta`` in bfloat16 would round the small delta away, and a float32
  matmul would be slower than the layer's own.

  Example:
    >>> import jax.numpy as jnp
    >>> from c3a_jax import ops
    >>> ops.can_fold(jnp.bfloat16, backend="cpu"), ops.can_fold(jnp.bfloat16, backend="gpu")
    (True, False)
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return True
  return dtype in (jnp.bfloat16, jnp.float16) and (backend or jax.default_backend()) == "cpu"


def takes_fold(strategy: str, x_shape: tuple[int, ...], w_shape: tuple[int, int, int]) -> bool:
  """Whether a layer whose kernel can absorb the delta (:func:`can_fold`) computes
  ``x @ (W + delta)`` under ``strategy``: always for ``"fold"``, for ``"auto"`` where
  :func:`choose_strategy` (``with_base=True``) picks it."""
  return strategy == "fold" or (
    strategy == "auto" and choose_strategy(x_shape, w_shape, with_base=True) == "fold"
  )


def choose_strategy(
  x_shape: tuple[int, ...],
  w_shape: tuple[int, int, int],
  backend: str | None = None,
  *,
  with_base: bool = False,
) -> Strategy:
  """The strategy ``"auto"`` uses for activations of ``x_shape`` and a kernel of ``w_shape``.

  Deterministic: a function of the shapes, the backend (default: JAX's default backend) and
  ``with_base`` only. The thresholds come from ``benchmarks/layer.py`` (see
  benchmarks/RESULTS.md).

  ``with_base=True`` says the delta goes into a Dense whose kernel can absorb it (the
  interceptor's case, :func:`can_fold`): then ``"fold"``, which leaves the adapter only the
  delta's build (two passes over a ``(d_in, d_out)`` matrix) and its kernel gradient, unless
  the tokens are too few to pay for the build: fewer than
  ``d_in * d_out / (2 * (d_in + d_out))``.

  Example:
    >>> from c3a_jax import ops
    >>> ops.choose_strategy((8, 128, 768), (6, 6, 128), backend="cpu")
    'fft'
    >>> ops.choose_strategy((2048, 4096), (16, 16, 256), backend="cpu")
    'freq_major'
    >>> ops.choose_strategy((2048, 4096), (16, 16, 256), with_base=True)
    'fold'
  """
  m, n, b = kernel_shape(w_shape, "choose_strategy")
  tokens = math.prod(x_shape[:-1])
  d_in, d_out = n * b, m * b
  if with_base and 2 * tokens * (d_in + d_out) >= d_in * d_out:
    return "fold"
  if b <= _DENSE_MAX_B or tokens <= _DENSE_MAX_TOKENS:
    return "dense"
  backend = backend or jax.default_backend()
  if backend != "cpu":
    # Not measured here (no accelerator in this project's CI): DFT matmuls feed the matrix
    # units up to moderate blocks, where an FFT of length b is latency-bound (on TPUs
    # especially); beyond, a (b, b) DFT per block costs too many flops and the FFT wins.
    return "freq_major" if b <= _FREQ_MAJOR_MAX_B else "fft"
  # CPU (benchmarks/RESULTS.md): with many blocks the batched frequency-major matmuls win,
  # until b is so large that the DFT-as-matmul costs more than an FFT.
  if b <= _FREQ_MAJOR_MAX_B and max(m, n) >= _FREQ_MAJOR_MIN_BLOCKS_CPU:
    return "freq_major"
  return "fft"
