"""Initial values of a C3A kernel, drawn as PEFT draws them."""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from c3a_jax.ops._kernel import kernel_shape

InitWeights = bool | Literal["xavier_uniform", "kaiming_uniform", "gaussian"]
INIT_WEIGHTS = (True, False, "xavier_uniform", "kaiming_uniform", "gaussian")


def init(key: jax.Array, shape: tuple[int, int, int], init_weights: InitWeights) -> jax.Array:
  """A float32 C3A kernel of ``shape = (d_out // b, d_in // b, b)``, initialised as PEFT does.

  ``True``: zeros (a no-op adapter). ``"xavier_uniform"`` or ``False``: U(-a, a) with
  ``a = sqrt(3) * sqrt(2 / (d_in + d_out))`` over the full layer's fans.
  ``"kaiming_uniform"``: U(-1/sqrt(d_in), 1/sqrt(d_in)). ``"gaussian"``: N(0, 1).

  Example:
    >>> import jax
    >>> from c3a_jax import ops
    >>> w = ops.init(jax.random.key(0), (2, 3, 4), "kaiming_uniform")
    >>> w.shape, bool(abs(w).max() <= 1 / 12 ** 0.5)
    ((2, 3, 4), True)
  """
  m, n, b = kernel_shape(shape, "init")
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
