"""The C3A product ``x @ delta_weight(w)``, computed by the strategy asked for."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from c3a_jax.ops import _fft, _freq_major
from c3a_jax.ops._fold import fold
from c3a_jax.ops._kernel import PRECISION, compute_dtype, delta_weight, kernel_shape
from c3a_jax.ops._strategy import Strategy, check_strategy, choose_strategy


def block_circulant_matmul(x: jax.Array, w: jax.Array, *, strategy: Strategy = "auto") -> jax.Array:
  """Applies the C3A weight change to ``x``: ``x @ delta_weight(w)`` computed with FFTs.

  Every strategy computes the same function (PEFT's math, float32 inside) and the same
  gradients; they differ in speed and in what the backward pass keeps:

  * ``"fft"``: rfft, complex einsum, irfft, differentiated by autodiff. The plain reference.
  * ``"freq_major"``: transforms as DFT matmuls whose output is frequency-major, so that the
    frequency product and the kernel gradient are matmuls batched over frequencies; a custom
    VJP keeps only ``x``. The fastest on CPU for many blocks of ``b <= 256`` (Llama widths),
    and the path for accelerators whose FFT is slow (TPUs): everything runs on matrix units.
  * ``"dense"``: builds the dense ``(d_in, d_out)`` delta and multiplies; cheapest for a
    handful of tokens or tiny blocks (``b <= 8``), where FFTs are all overhead.
  * ``"fold"``: the forward as ``"dense"``, the kernel gradient as a spectral correlation
    (:func:`fold`). Its point is inside an adapted float32 Dense (on CPU a bfloat16 one too,
    :func:`can_fold`), where :func:`c3a_jax.intercept` folds the delta into the frozen kernel
    (``x @ (W + delta)``), so that the forward and the input gradient ride on the base
    layer's own matmuls; ``"auto"`` picks it there. (``"merged"``, its old name, still
    works, with a DeprecationWarning.)
  * ``"auto"`` (default): picks one of the above from the block size, the number of blocks,
    the token count and the backend (:func:`choose_strategy`); the choice is a pure function
    of the shapes, so a given shape always takes the same path.

  Args:
    x: ``(..., n*b)`` activations, any float dtype and any number of leading axes.
    w: ``(m, n, b)`` C3A kernel.
    strategy: one of :data:`STRATEGIES`.

  Returns:
    ``(..., m*b)`` in ``x``'s dtype. The arithmetic runs in float32 whatever the input dtype,
    except in JAX's x64 mode, where a float64 ``x`` or ``w`` runs in float64 (``"fft"`` or
    ``"dense"``; other strategies compute as ``"fft"`` there).

  Example:
    >>> import jax.numpy as jnp
    >>> from c3a_jax import ops
    >>> x, w = jnp.ones((4, 8)), jnp.ones((2, 2, 4))
    >>> bool(jnp.allclose(ops.block_circulant_matmul(x, w, strategy="freq_major"),
    ...                   ops.block_circulant_matmul(x, w, strategy="fft"), atol=1e-6))
    True
  """
  m, n, b = kernel_shape(w, "block_circulant_matmul")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"block_circulant_matmul: x must be floating point, got {x.dtype}")
  if x.shape[-1] != n * b:
    raise ValueError(
      f"block_circulant_matmul: x has {x.shape[-1]} features but the C3A kernel of shape "
      f"{tuple(w.shape)} (m, n, b) expects n*b = {n * b}"
    )
  strategy = check_strategy(strategy, "block_circulant_matmul")
  if strategy == "auto":
    strategy = choose_strategy(x.shape, w.shape)
  dtype = compute_dtype(x.dtype, w.dtype)
  if dtype == jnp.float64 and strategy != "dense":
    strategy = "fft"  # float64 (x64 mode) takes the exact paths; the others are float32 inside
  lead = x.shape[:-1]
  x2 = x.reshape(-1, n * b)
  if strategy == "fft":
    y = _fft.apply(x2, w)
  elif strategy == "freq_major":
    y = _freq_major.apply(x2.astype(jnp.float32), w)
  elif strategy == "dense":
    y = jnp.matmul(x2.astype(dtype), delta_weight(w).astype(dtype), precision=PRECISION)
  else:
    y = fold(x2, w)
  return y.reshape(*lead, m * b).astype(x.dtype)
