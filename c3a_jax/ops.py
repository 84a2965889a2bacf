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

import math
from typing import Any, Literal, Union

import jax
import jax.numpy as jnp

InitWeights = Union[bool, Literal["xavier_uniform", "kaiming_uniform", "gaussian"]]
INIT_WEIGHTS = (True, False, "xavier_uniform", "kaiming_uniform", "gaussian")


def block_circulant_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """Applies the C3A weight change to ``x``: ``x @ delta_weight(w)`` computed with FFTs.

  Args:
    x: ``(..., n*b)`` activations, any float dtype and any number of leading axes.
    w: ``(m, n, b)`` C3A kernel.

  Returns:
    ``(..., m*b)`` in ``x``'s dtype. The FFT runs in float32 whatever the input dtype.
  """
  m, n, b = _kernel_shape(w, "block_circulant_matmul")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"block_circulant_matmul: x must be floating point, got {x.dtype}")
  if x.shape[-1] != n * b:
    raise ValueError(
        f"block_circulant_matmul: x has {x.shape[-1]} features but the C3A kernel of shape "
        f"{tuple(w.shape)} (m, n, b) expects n*b = {n * b}")
  lead = x.shape[:-1]
  xf = jnp.fft.rfft(x.astype(jnp.float32).reshape(*lead, n, b), axis=-1)
  # The 1/d_in scale goes on the small kernel spectrum, not the (tokens, d_out) output.
  wf = jnp.conj(jnp.fft.rfft(w.astype(jnp.float32), axis=-1)) / (n * b)
  yf = jnp.einsum("...jf,ijf->...if", xf, wf)
  return jnp.fft.irfft(yf, n=b, axis=-1).reshape(*lead, m * b).astype(x.dtype)


def delta_weight(w: jax.Array) -> jax.Array:
  """The dense weight change of C3A kernel ``w`` in Flax ``(d_in, d_out)`` layout, float32.

  ``delta_weight(w).T`` is PEFT's ``get_delta_weight`` (PyTorch ``(out, in)`` layout).
  """
  m, n, b = _kernel_shape(w, "delta_weight")
  r = jnp.arange(b)
  # blocks[i, j, r, c] = w[i, j, (c - r) mod b]: each row is the previous one shifted right.
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
