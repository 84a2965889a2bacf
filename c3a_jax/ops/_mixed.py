"""Many adapters in one batch: each row of ``x`` times its own adapter's C3A delta.

``w`` holds ``K`` adapters' kernels, ``(K, m, n, b)``; ``index[r]`` names row ``r``'s (``-1``:
none, the base model). The kernels' spectra are gathered per row (``(rows, m, n, F)``, the
size of ``rows`` C3A kernels), never ``K`` dense deltas, and the frequency product is batched
over rows: the same transforms and flops as one adapter for the whole batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from c3a_jax.ops import _fft
from c3a_jax.ops._kernel import PRECISION, compute_dtype


def mixed_matmul(x: jax.Array, w: jax.Array, index: jax.Array) -> jax.Array:
  """``x[r] @ delta_weight(w[index[r]])`` for every row ``r``; zero where ``index[r] == -1``.

  Args:
    x: ``(rows, ..., n * b)`` activations, any float dtype; row ``r`` is ``x[r]``.
    w: ``(K, m, n, b)`` C3A kernels, one per adapter slot.
    index: ``(rows,)`` integers in ``[-1, K)``. Inside ``jit`` an index out of that range
      cannot raise: its row comes out NaN, which no loss lets pass unseen.

  Returns:
    ``(rows, ..., m * b)`` in ``x``'s dtype, computed in float32 (float64 under x64).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from c3a_jax import ops
    >>> w = jax.random.normal(jax.random.key(0), (2, 3, 2, 4))   # 2 adapters
    >>> x = jnp.ones((3, 5, 8))
    >>> y = ops.mixed_matmul(x, w, jnp.array([1, -1, 0]))
    >>> bool(jnp.allclose(y[0], ops.block_circulant_matmul(x[0], w[1]), atol=1e-5))
    True
    >>> bool((y[1] == 0).all())
    True
  """
  if w.ndim != 4:
    raise ValueError(f"mixed_matmul: adapter kernels are (K, m, n, b), got shape {w.shape}")
  k, m, n, b = w.shape
  index = jnp.asarray(index)
  if index.shape != (x.shape[0],) or not jnp.issubdtype(index.dtype, jnp.integer):
    raise ValueError(
      f"mixed_matmul: adapter_index must be integers of shape ({x.shape[0]},), one per row "
      f"of the input {tuple(x.shape)}; got {index.dtype} of shape {index.shape}"
    )
  if x.shape[-1] != n * b:
    raise ValueError(
      f"mixed_matmul: x has {x.shape[-1]} features but the kernels {tuple(w.shape)} "
      f"(K, m, n, b) expect n*b = {n * b}"
    )
  if not isinstance(index, jax.core.Tracer):
    host = np.asarray(index)
    bad = host[(host < -1) | (host >= k)]
    if bad.size:
      raise ValueError(f"mixed_matmul: adapter_index holds {bad.tolist()}; valid: -1 to {k - 1}")
  dtype = compute_dtype(x.dtype, w.dtype)
  lead = x.shape[:-1]
  xf = jnp.fft.rfft(x.astype(dtype).reshape(x.shape[0], -1, n, b), axis=-1)
  wf = _fft.kernel_spectrum(w, dtype)
  valid = (index >= 0) & (index < k)
  # -1 rows get a zero spectrum; any other invalid index a NaN one.
  fill = jnp.where(index == -1, 0.0, jnp.nan).astype(wf.dtype)
  picked = jnp.where(
    valid[:, None, None, None], wf[jnp.where(valid, index, 0)], fill[:, None, None, None]
  )
  yf = jnp.einsum("rtjf,rijf->rtif", xf, picked, precision=PRECISION)
  y = jnp.fft.irfft(yf, n=b, axis=-1)
  return y.reshape(*lead, m * b).astype(x.dtype)
