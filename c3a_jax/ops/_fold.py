"""C3A folded into a matmul: ``y = x @ (W + delta)``, the kernel gradient computed spectrally.

An adapted float32 Dense computes ``x @ W + x @ delta`` whichever way it is written; written
as ``x @ W'`` with ``W' = W + delta``, the forward and the input gradient ride on the base
layer's own matmuls (``x @ W'`` and ``g @ W'.T``), so the adapter adds only building ``delta``
(``d_in * d_out`` elements, no flops to speak of) and its kernel gradient. That gradient is not
taken through ``W'`` (which would be the full ``x.T @ g`` matmul a frozen layer never pays
for) but as C3A's correlation of spectra summed over tokens (``_kernel_grad``).

``W'`` is not kept for the backward pass (one ``(d_in, d_out)`` buffer per adapted layer) but
rebuilt there, once the layer's gradient has arrived.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from c3a_jax.ops._kernel import PRECISION, delta_weight, kernel_shape
from c3a_jax.ops._kernel_grad import kernel_grad
from c3a_jax.ops._spectral import ordered_after


def fold(
  x: jax.Array,
  w: jax.Array,
  kernel: jax.Array | None = None,
  *,
  precision: jax.lax.PrecisionLike = None,
) -> jax.Array:
  """``x @ (kernel + delta_weight(w))`` in float32; ``kernel=None``: ``x @ delta_weight(w)``.

  The interceptor computes a plain ``flax.linen.Dense`` this way where :func:`can_fold` says
  its product is full float32 (CPU; elsewhere a float32 layer at ``HIGHEST``) and, under
  ``"auto"``, where :func:`choose_strategy` picks it (on CPU, with enough tokens to pay for
  building ``W'`` twice). The delta's accuracy is then that of the layer's own product,
  relative to ``W``: at TF32 or one bfloat16 pass the small delta would be rounded away.

  Args:
    x: ``(..., d_in)`` activations, any float dtype; computed in float32.
    w: ``(m, n, b)`` C3A kernel with ``n * b = d_in``.
    kernel: ``(d_in, d_out)`` frozen Dense kernel, or None.
    precision: the frozen layer's (``flax.linen.Dense(precision=...)``), passed to the matmuls
      with ``kernel``; without a kernel the product is C3A's alone and runs at
      :data:`c3a_jax.ops.PRECISION`.

  Returns:
    ``(..., d_out)`` float32. Gradients flow to ``x``, ``w`` and ``kernel`` (the last is a
    full matmul; under ``jit`` XLA drops it when the kernel is frozen).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from c3a_jax import ops
    >>> x, k = jnp.ones((4, 8)), jnp.eye(8, 12)
    >>> w = jnp.arange(24.0).reshape(3, 2, 4)
    >>> bool(jnp.allclose(ops.fold(x, w, k), x @ k + ops.block_circulant_matmul(x, w),
    ...                   atol=1e-5))
    True
  """
  m, n, b = kernel_shape(w, "fold")
  if x.shape[-1] != n * b or (kernel is not None and kernel.shape != (n * b, m * b)):
    raise ValueError(
      f"fold: x has {x.shape[-1]} features and the kernel shape "
      f"{None if kernel is None else tuple(kernel.shape)}, but the C3A kernel of shape "
      f"{tuple(w.shape)} (m, n, b) needs x with n*b = {n * b} features and a kernel "
      f"({n * b}, {m * b})"
    )
  if kernel is None:
    precision = PRECISION
  lead = x.shape[:-1]
  # x and the kernel keep their dtypes (the backward pass keeps x) and are cast where used.
  return _fold(x.reshape(-1, n * b), w, kernel, precision).reshape(*lead, m * b)


def _weight(w, kernel):
  delta = delta_weight(w)
  return delta if kernel is None else kernel.astype(jnp.float32) + delta


def _f32(x):
  return x.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fold(x, w, kernel, precision):
  return jnp.matmul(_f32(x), _weight(w, kernel), precision=precision)


def _fold_fwd(x, w, kernel, precision):
  # Keeps what is alive anyway (x, the kernels); W' is rebuilt in the backward pass.
  return _fold(x, w, kernel, precision), (x, w, kernel)


def _fold_bwd(precision, residuals, g):
  x, w, kernel = residuals
  # Rebuilt after g arrives: left free, XLA would reuse the forward's W', holding every
  # adapted layer's until the backward pass.
  dx = jnp.matmul(g, _weight(ordered_after(w, g), kernel).T, precision=precision)
  dw = kernel_grad(x, g, w)
  dkernel = None
  if kernel is not None:
    dkernel = jnp.matmul(_f32(x).T, g, precision=precision).astype(kernel.dtype)
  return dx.astype(x.dtype), dw.astype(w.dtype), dkernel


_fold.defvjp(_fold_fwd, _fold_bwd)
