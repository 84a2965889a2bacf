"""A C3A kernel ``(m, n, b)``: its shape check, what it computes in, and the dense weight change
it stands for."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def kernel_shape(w: Any, where: str) -> tuple[int, int, int]:
  """``(m, n, b)`` of a C3A kernel (an array or a shape); a ValueError naming ``where`` if not.

  Example:
    >>> import jax.numpy as jnp
    >>> from c3a_jax import ops
    >>> ops.kernel_shape(jnp.zeros((3, 2, 4)), "my_layer")   # d_out = 12, d_in = 8, b = 4
    (3, 2, 4)
    >>> ops.kernel_shape((12, 8), "my_layer")
    Traceback (most recent call last):
    ...
    ValueError: my_layer: a C3A kernel has shape (d_out // b, d_in // b, b), got (12, 8)
  """
  shape = tuple(getattr(w, "shape", w))
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"{where}: a C3A kernel has shape (d_out // b, d_in // b, b), got {shape}")
  return shape


PRECISION = jax.lax.Precision.HIGHEST
"""The precision of every matmul inside the C3A math, on every backend and whatever
``jax_default_matmul_precision`` says: XLA's default float32 matmul is TF32 on NVIDIA GPUs
(about 10 mantissa bits) and one bfloat16 pass on TPUs, which would leave a float32 layer's
delta about 1e-3 off PEFT's. A frozen layer's own product keeps its user's precision."""


def compute_dtype(*dtypes: Any) -> Any:
  """What C3A computes in: float32, or float64 where an input is (JAX's x64 mode)."""
  return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def delta_weight(w: jax.Array) -> jax.Array:
  """The dense weight change of C3A kernel ``w`` in Flax ``(d_in, d_out)`` layout, float32
  (float64 for a float64 kernel).

  ``delta_weight(w).T`` is PEFT's ``get_delta_weight`` (PyTorch ``(out, in)`` layout).

  Example:
    >>> import jax.numpy as jnp
    >>> from c3a_jax import ops
    >>> ops.delta_weight(jnp.array([[[1.0, 2.0]]])) * 2   # one 2x2 circulant block, d_in = 2
    Array([[1., 2.],
           [2., 1.]], dtype=float32)
  """
  m, n, b = kernel_shape(w, "delta_weight")
  r = jnp.arange(b)
  # blocks[i, j, r, c] = w[i, j, (c - r) mod b]: each row is the previous one shifted right.
  # (A (b, b) index array: one gather straight into (d_in, d_out) would index with a
  # (d_in * d_out, 3) array, three times the size of the result.)
  blocks = w.astype(compute_dtype(w.dtype))[:, :, (r[None, :] - r[:, None]) % b]
  # (i, j, r, c) -> rows j*b + c (input), columns i*b + r (output).
  return blocks.transpose(1, 3, 0, 2).reshape(n * b, m * b) / (n * b)
