"""What a linear layer's call contracts, written as an einsum, and C3A's rows in and out of it.

Every layer C3A adapts computes ``einsum("<x>,<kernel>-><out>", x, kernel)``: ``nn.Dense`` is
``"...a,ab->...b"``, ``nn.DenseGeneral(features=(4, 5), axis=-1)`` ``"...a,abc->...bc"``, and
``nn.Einsum`` says its own. The layout rule: the kernel axes the input
contracts with are "in" and must lead the kernel; the rest are "out". Flattened in the kernel's
order, they give the ``(d_in, d_out)`` matrix whose C3A kernel is ``(d_out // b, d_in // b, b)``;
PEFT's ``torch.nn.Linear`` weight is that matrix transposed.

Example:
  >>> import jax.numpy as jnp
  >>> c = Contraction.parse("BTD,DNH->BTNH", (2, 3, 8), (8, 2, 4))
  >>> c.n_in, c.to_rows(jnp.ones((2, 3, 8))).shape, c.from_rows(jnp.ones((2, 3, 8))).shape
  (1, (2, 3, 8), (2, 3, 2, 4))
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import opt_einsum


@dataclasses.dataclass(frozen=True)
class Contraction:
  """``einsum(f"{x},{kernel}->{out}")`` with ellipses spelled out; ``shape`` is the kernel's."""

  x: str
  kernel: str
  out: str
  shape: tuple[int, ...]

  @classmethod
  def parse(
    cls,
    spec: str,
    x_shape: Sequence[int],
    kernel_shape: Sequence[int],
    *,
    any_order: bool = False,
  ) -> Contraction:
    """From an einsum string; a ValueError saying why if C3A cannot adapt it. ``any_order``
    lets the input's axes sit anywhere in the kernel (Gemma's ``"BTD,NDH->BTNH"``), for layers
    that say their contraction themselves (NNX); the kernel is then flattened through
    :attr:`perm`."""
    operands, out, _ = opt_einsum.parser.parse_einsum_input(
      (spec.replace(" ", ""), _Shaped(tuple(x_shape)), _Shaped(tuple(kernel_shape)))
    )
    x, kernel = operands.split(",")
    c = cls(x, kernel, out, tuple(kernel_shape))
    c.check(spec, any_order=any_order)
    return c

  @property
  def ins(self) -> str:
    return "".join(a for a in self.kernel if a in self.x)

  @property
  def outs(self) -> str:
    return "".join(a for a in self.kernel if a not in self.x)

  @property
  def free(self) -> str:
    return "".join(a for a in self.x if a not in self.kernel)

  @property
  def n_in(self) -> int:
    """How many kernel axes are "in" (leading, once ordered by :attr:`perm`)."""
    return len(self.ins)

  @property
  def perm(self) -> tuple[int, ...]:
    """The kernel's axes, "in" first: ``kernel.transpose(perm)`` is in the layout rule's order."""
    return tuple(self.kernel.index(a) for a in self.ins + self.outs)

  def _size(self, axes: str) -> int:
    return math.prod(self.shape[self.kernel.index(a)] for a in axes)

  @property
  def d_in(self) -> int:
    return self._size(self.ins)

  @property
  def d_out(self) -> int:
    return self._size(self.outs)

  def flat_kernel(self, kernel: jax.Array) -> jax.Array:
    """``kernel`` as the ``(d_in, d_out)`` matrix of the layout rule."""
    return jnp.transpose(kernel, self.perm).reshape(self.d_in, self.d_out)

  def check(self, spec: str, *, any_order: bool = False) -> None:
    shared = [a for a in self.kernel if a in self.x and a in self.out]
    summed = [a for a in self.kernel if a not in self.x and a not in self.out]
    if shared or summed or len(set(self.kernel)) != len(self.kernel):
      raise ValueError(
        f"einsum {spec!r} is not a linear map of the input: its kernel axes "
        f"{shared + summed} are batch or summed axes; C3A adapts kernels whose every axis is "
        "contracted with the input or kept in the output"
      )
    if not self.ins or not self.outs or (not any_order and self.kernel != self.ins + self.outs):
      raise ValueError(
        f"einsum {spec!r}: the kernel axes the input contracts with ({self.ins!r}) must come "
        f"first in the kernel {self.kernel!r}, then the output axes ({self.outs!r}): C3A flattens "
        "them in that order (README, 'Layers beyond Dense')"
      )
    if sorted(self.out) != sorted(self.free + self.outs):
      raise ValueError(f"einsum {spec!r} has output axes that are neither input nor kernel axes")

  def to_rows(self, x: jax.Array) -> jax.Array:
    """``x`` as ``(*free axes, d_in)``, its contracted axes last in the kernel's order."""
    moved = jnp.einsum(f"{self.x}->{self.free}{self.ins}", x)
    return moved.reshape(*moved.shape[: len(self.free)], self.d_in)

  def from_rows(self, z: jax.Array) -> jax.Array:
    """``(*free axes, d_out)`` rows laid out as the layer's output."""
    z = z.reshape(*z.shape[:-1], *(self.shape[self.kernel.index(a)] for a in self.outs))
    return jnp.einsum(f"{self.free}{self.outs}->{self.out}", z)

  def bias_shape(self) -> tuple[int, ...]:
    """Where a bias over the kernel's output axes broadcasts in the output."""
    dims = dict(zip(self.kernel, self.shape, strict=True))
    return tuple(dims.get(a, 1) for a in self.out)


@dataclasses.dataclass(frozen=True)
class _Shaped:
  """What opt_einsum's parser reads of an operand: its shape (no array is allocated)."""

  shape: tuple[int, ...]


def _letters(n: int) -> str:
  return string.ascii_letters[:n]


def over_axes(
  x_shape: Sequence[int], kernel_shape: Sequence[int], axes: Sequence[int]
) -> Contraction:
  """A DenseGeneral-like layer: ``x``'s ``axes`` (in that order) contract with the kernel's
  leading axes; the kernel's other axes are appended to ``x``'s remaining ones."""
  ndim = len(x_shape)
  axes = [a % ndim for a in axes]
  letters = _letters(ndim + len(kernel_shape) - len(axes))
  xs, feats = letters[:ndim], letters[ndim:]
  ins = "".join(xs[a] for a in axes)
  out = "".join(a for a in xs if a not in ins) + feats
  return Contraction.parse(f"{xs},{ins}{feats}->{out}", x_shape, kernel_shape)


def as_axes(axis: int | Sequence[int]) -> tuple[int, ...]:
  """An ``axis`` attribute (an int or a sequence of them) as a tuple."""
  return tuple(axis) if isinstance(axis, Sequence) else (axis,)


def stores_out_in(module: nn.Module) -> bool:
  """transformers' FlaxConv1D (GPT-2) keeps its kernel ``(out, in)``; matched by name so that
  transformers stays an optional dependency."""
  return type(module).__name__ == "FlaxConv1D"


def of_module(module: nn.Module, args: tuple, kwargs: dict) -> Contraction:
  """The contraction of a linen ``module``'s ``__call__(*args, **kwargs)``; a ValueError if C3A
  cannot adapt it (the message says why, without the layer's path, which the caller adds)."""
  x = args[0] if args else kwargs.get("inputs")
  shape = tuple(np.shape(nn.unbox(module.get_variable("params", "kernel"))))
  if stores_out_in(module):  # x @ kernel.T: the input contracts with the kernel's last axis
    return Contraction.parse("...a,ba->...b", np.shape(x), shape, any_order=True)
  if isinstance(module, nn.Einsum):
    spec = args[1] if len(args) > 1 else kwargs.get("einsum_str") or module.einsum_str
    return Contraction.parse(spec, np.shape(x), shape)
  if isinstance(module, nn.DenseGeneral):
    if module.batch_dims:
      raise ValueError(
        f"DenseGeneral with batch_dims={module.batch_dims} has one kernel per batch index; "
        "C3A adapts DenseGeneral without batch_dims"
      )
    return over_axes(np.shape(x), shape, as_axes(module.axis))
  if isinstance(module, nn.Dense):
    return over_axes(np.shape(x), shape, (-1,))
  raise ValueError(f"{type(module).__name__} is not a layer C3A adapts")
