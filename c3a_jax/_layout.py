"""How a C3A kernel lies over its layer's kernel: stack axes, "in" axes, "out" axes; boxes.

A layer's kernel is ``(*stack, *in, *out)``: leading stack axes (``nn.scan`` / ``nn.vmap``
layers), then the axes the input contracts with, then the output axes (FlaxConv1D, GPT-2's, is
the one ``(out, in)`` layer: its C3A leaf is ``c3a_kernel_out_in``). Its C3A kernel is
``(*stack, d_out // b, d_in // b, b)`` with ``d_in``, ``d_out`` the products of the in and out
axes. After ``attach`` the two shapes alone give the split, so no function past ``attach``
needs the model: where size-1 axes make the split ambiguous, every choice is the same matrix.

Flax boxes (``nn.Partitioned``, ``nn.LogicallyPartitioned``) are leaves here: read through,
and kept on what is written back.

Example:
  >>> lay = of_shapes((4, 16, 2, 8), (4, 4, 4, 4), where="layers.q")
  >>> lay.stack, lay.shape, lay.d_in, lay.d_out
  ((4,), (16, 2, 8), 16, 16)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from c3a_jax import ops
from c3a_jax._tree import is_box

# The leaf a layer's C3A kernel takes: "_out_in" where the layer stores its kernel (out, in).
C3A_LEAVES = ("c3a_kernel", "c3a_kernel_out_in")


@dataclasses.dataclass(frozen=True)
class Layout:
  """A kernel of shape ``(*stack, *shape)`` whose first ``n_in`` axes of ``shape`` are "in"."""

  stack: tuple[int, ...]
  shape: tuple[int, ...]
  n_in: int
  out_in: bool = False  # a 2-D kernel stored (d_out, d_in)

  @property
  def d_in(self) -> int:
    split = self.shape[self.n_in :] if self.out_in else self.shape[: self.n_in]
    return math.prod(split)

  @property
  def d_out(self) -> int:
    split = self.shape[: self.n_in] if self.out_in else self.shape[self.n_in :]
    return math.prod(split)

  def c3a_shape(self, b: int) -> tuple[int, ...]:
    return (*self.stack, self.d_out // b, self.d_in // b, b)


def of_shapes(
  kernel: tuple[int, ...], c3a: tuple[int, ...], *, where: str, out_in: bool = False
) -> Layout:
  """The layout of a layer with ``kernel`` shape holding a C3A kernel of shape ``c3a``.

  Raises:
    ValueError: naming ``where``, when no split of the kernel fits the C3A kernel.
  """
  kernel, c3a = tuple(kernel), tuple(c3a)
  n_stack = len(c3a) - 3
  if n_stack >= 0 and kernel[:n_stack] == c3a[:n_stack] and len(kernel) - n_stack >= 2:
    m, n, b = c3a[n_stack:]
    shape = kernel[n_stack:]
    if out_in:
      fits = [1] if shape == (m * b, n * b) else []
    else:
      fits = [
        k
        for k in range(1, len(shape))
        if math.prod(shape[:k]) == n * b and math.prod(shape[k:]) == m * b
      ]
    if fits:
      return Layout(c3a[:n_stack], shape, fits[0], out_in)
  sizes = (
    f"(*stack, m, n, b), for a layer with d_in={c3a[-2] * c3a[-1]} and d_out="
    f"{c3a[-3] * c3a[-1]} at block size {c3a[-1]}"
    if len(c3a) >= 3
    else "not (*stack, m, n, b)"
  )
  raise ValueError(
    f"{where} has shape {c3a} {sizes}; but the layer's kernel {kernel} has no split into "
    + ("(*stack, d_out, d_in)" if out_in else "(*stack, *in axes, *out axes)")
    + " of those sizes"
  )


def fits_as_set(fit: Callable[[tuple], Layout], shape: tuple[int, ...]) -> Layout | None:
  """The layout of a C3A kernel ``shape`` read as a set of adapters (a slot axis before
  ``(m, n, b)``, :func:`c3a_jax.stack_adapters`) by ``fit`` (:func:`of_shapes` of the layer),
  or None if it does not fit as one either."""
  if len(shape) < 4:
    return None
  try:
    return fit((*shape[:-4], *shape[-3:]))
  except ValueError:
    return None


def delta(w: jax.Array, layout: Layout) -> jax.Array:
  """The dense weight change of ``w`` in the shape of the layer's kernel (float32; float64 for
  a float64 ``w`` under x64)."""
  flat = jnp.reshape(w, (-1, *w.shape[-3:]))
  d = jax.vmap(ops.delta_weight)(flat)
  if layout.out_in:
    d = d.transpose(0, 2, 1)
  return d.reshape(*layout.stack, *layout.shape)


def rebox(like: Any, value: Any) -> Any:
  """``value`` in the box ``like`` is in (names and all), or bare where ``like`` is bare."""
  return like.replace_boxed(value) if is_box(like) else value


def box_c3a(kernel: Any, w: jax.Array, layout: Layout) -> Any:
  """The C3A kernel ``w`` boxed as its layer's ``kernel`` is: its stack axes keep their
  names, ``(m, n, b)`` are ``None`` (unsharded by name; the kernel is small)."""
  if not is_box(kernel) or not hasattr(kernel, "names"):
    return rebox(kernel, w)
  names = tuple(kernel.names)[: len(layout.stack)] + (None,) * 3
  return dataclasses.replace(kernel, value=w, names=names)
