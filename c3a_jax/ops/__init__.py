"""The C3A math: a block-circulant weight change applied with FFTs. No Flax here.

A C3A kernel ``w`` of shape ``(m, n, b)`` stands for the ``(m*b, n*b)`` (PyTorch ``(out, in)``)
matrix whose ``(i, j)`` block is circulant with first row ``w[i, j]``::

    delta[i*b + r, j*b + c] = w[i, j, (c - r) mod b] / d_in        d_in = n * b

The ``1 / d_in`` scale is PEFT's; keeping it makes adapters interchangeable with PEFT. Every
matmul here runs at :data:`PRECISION` (``HIGHEST``), so a float32 layer's delta is float32-exact
on every backend, whatever ``jax_default_matmul_precision`` says. This sub-package imports
nothing else from ``c3a_jax`` but the deprecated names (``c3a_jax._compat``, which imports
nothing): it is the bottom layer.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from c3a_jax import ops
  >>> w = jax.random.normal(jax.random.key(0), (3, 2, 4))   # d_out = 12, d_in = 8
  >>> x = jnp.ones((5, 8))
  >>> y = ops.block_circulant_matmul(x, w)
  >>> bool(jnp.allclose(y, x @ ops.delta_weight(w), atol=1e-5))
  True
"""

from c3a_jax.ops._fold import fold
from c3a_jax.ops._init import INIT_WEIGHTS, InitWeights, init
from c3a_jax.ops._kernel import PRECISION, compute_dtype, delta_weight, kernel_shape
from c3a_jax.ops._matmul import block_circulant_matmul
from c3a_jax.ops._mixed import mixed_matmul
from c3a_jax.ops._spectral import dft_halves, kernel_spectrum
from c3a_jax.ops._strategy import (
  STRATEGIES,
  Strategy,
  can_fold,
  check_strategy,
  choose_strategy,
  takes_fold,
)

__all__ = [
  "INIT_WEIGHTS",
  "PRECISION",
  "STRATEGIES",
  "InitWeights",
  "Strategy",
  "block_circulant_matmul",
  "can_fold",
  "check_strategy",
  "choose_strategy",
  "compute_dtype",
  "delta_weight",
  "dft_halves",
  "fold",
  "init",
  "kernel_shape",
  "kernel_spectrum",
  "mixed_matmul",
  "takes_fold",
]
