"""How the C3A product is computed: the strategy names, and the one ``"auto"`` picks."""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp

from c3a_jax import _compat
from c3a_jax.ops._kernel import kernel_shape

Strategy = Literal["auto", "fft", "freq_major", "dense", "fold"]
STRATEGIES: tuple[Strategy, ...] = ("auto", "fft", "freq_major", "dense", "fold")
"""How :func:`block_circulant_matmul` computes the same product (see its docstring)."""

# "auto" thresholds on CPU, from benchmarks/layer.py on a 2-core machine (benchmarks/RESULTS.md).
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
  strategy = _compat.renamed_strategy(strategy, where, stacklevel=stacklevel)
  if strategy not in STRATEGIES:
    raise ValueError(f"{where}: strategy={strategy!r} is not one of {STRATEGIES}")
  return strategy


def can_fold(
  dtype: Any, backend: str | None = None, precision: jax.lax.PrecisionLike = None
) -> bool:
  """Whether a Dense computing in ``dtype`` at ``precision`` on ``backend`` can take
  ``"fold"`` (``x @ (W + delta)``, :func:`fold`) without rounding the delta.

  The folded delta is as accurate as the layer's own product, relative to ``W``, so that product
  must be full float32. On CPU it always is: XLA:CPU computes float32 matmuls exactly, and
  bfloat16 and float16 ones as float32 ones (it converts the operands; the results are
  bit-identical), so the float32 ``W + delta`` rounds nothing the base layer does not, and
  costs no more. On accelerators only a float32 layer at ``HIGHEST`` (its own ``precision``, or
  else ``jax_default_matmul_precision``): XLA's default float32 matmul is TF32 on NVIDIA GPUs
  and one bfloat16 pass on TPUs (a folded delta measured percents off on an H200,
  benchmarks/RESULTS.md), and a low-precision matmul is native there (``W + delta`` in bfloat16
  would round the delta away).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from c3a_jax import ops
    >>> ops.can_fold(jnp.bfloat16, backend="cpu"), ops.can_fold(jnp.bfloat16, backend="gpu")
    (True, False)
    >>> ops.can_fold(jnp.float32, "gpu"), ops.can_fold(jnp.float32, "gpu", "highest")
    (False, True)
  """
  dtype = jnp.dtype(dtype)
  if (backend or jax.default_backend()) == "cpu":
    return dtype in (jnp.float32, jnp.bfloat16, jnp.float16)
  return dtype == jnp.float32 and _full_float32(precision)


def _full_float32(precision: jax.lax.PrecisionLike) -> bool:
  """Whether a float32 matmul at ``precision`` (None: JAX's default) is exact float32."""
  if precision is None:
    precision = jax.config.jax_default_matmul_precision
  if isinstance(precision, (tuple, list)):
    return all(_full_float32(p) for p in precision)
  if isinstance(precision, jax.lax.DotAlgorithmPreset):
    return precision == jax.lax.DotAlgorithmPreset.F32_F32_F32
  try:
    return jax.lax.Precision(precision) == jax.lax.Precision.HIGHEST
  except (TypeError, ValueError):  # None left (XLA's default), or a name JAX does not know
    return False


def takes_fold(strategy: str, x_shape: tuple[int, ...], w_shape: tuple[int, int, int]) -> bool:
  """Whether a layer whose kernel can absorb the delta (:func:`can_fold`) computes
  ``x @ (W + delta)`` under ``strategy``: always for ``"fold"``, for ``"auto"`` where
  :func:`choose_strategy` (``with_base=True``) picks it.

  Example:
    >>> from c3a_jax import ops
    >>> ops.takes_fold("fold", (4, 768), (6, 6, 128)), ops.takes_fold("fft", (4, 768), (6, 6, 128))
    (True, False)
    >>> ops.takes_fold("auto", (2048, 4096), (16, 16, 256)) == (jax.default_backend() == "cpu")
    True
  """
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
  ``with_base`` only. A table per backend, from ``benchmarks/layer.py`` and
  ``benchmarks/accelerator.py`` (see benchmarks/RESULTS.md):

  * CPU (measured on a 2-core x86 machine): ``"fold"`` where it can
    (``with_base=True``, below) with tokens enough to pay for building the delta, at least
    ``d_in * d_out / (2 * (d_in + d_out))``; ``"dense"`` for ``b <= 8`` or at most 16 tokens;
    ``"freq_major"`` for many blocks (``max(m, n) >= 16``) of ``b <= 256``; else ``"fft"``.
  * GPU (measured on an NVIDIA H200, bfloat16 and float32 layers of 768 to 4096 x 11008,
    ``b`` of 64 to 256, 16,384 tokens): ``"fft"``, which beat ``"freq_major"``,
    ``"dense"`` and a folded Dense at every one of those shapes. Token counts of a few dozen
    and ``b <= 8`` are not measured there yet.
  * TPU (not measured: no TPU has been lent to this project): ``"freq_major"`` up to
    ``b = 256``, whose transforms are matmuls on the matrix units (a TPU's FFT is slow), and
    ``"fft"`` beyond, where a ``(b, b)`` DFT per block costs too many flops.

  ``with_base=True`` says the delta goes into a Dense whose kernel can absorb it (the
  interceptor's case, :func:`can_fold`); ``"fold"`` then leaves the adapter only the delta's
  build (two passes over a ``(d_in, d_out)`` matrix) and its kernel gradient.

  Example:
    >>> from c3a_jax import ops
    >>> ops.choose_strategy((8, 128, 768), (6, 6, 128), backend="cpu")
    'fft'
    >>> ops.choose_strategy((2048, 4096), (16, 16, 256), backend="cpu")
    'freq_major'
    >>> ops.choose_strategy((2048, 4096), (16, 16, 256), backend="cpu", with_base=True)
    'fold'
    >>> ops.choose_strategy((16384, 4096), (16, 16, 256), backend="gpu", with_base=True)
    'fft'
  """
  m, n, b = kernel_shape(w_shape, "choose_strategy")
  tokens = math.prod(x_shape[:-1])
  backend = backend or jax.default_backend()
  if backend == "gpu":
    return "fft"
  if backend == "tpu":
    return "freq_major" if b <= _FREQ_MAJOR_MAX_B else "fft"
  d_in, d_out = n * b, m * b
  if with_base and 2 * tokens * (d_in + d_out) >= d_in * d_out:
    return "fold"
  if b <= _DENSE_MAX_B or tokens <= _DENSE_MAX_TOKENS:
    return "dense"
  if b <= _FREQ_MAJOR_MAX_B and max(m, n) >= _FREQ_MAJOR_MIN_BLOCKS_CPU:
    return "freq_major"
  return "fft"
