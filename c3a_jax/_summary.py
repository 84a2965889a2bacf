"""How many parameters train, and their share of the model.

Example:
  >>> import jax, jax.numpy as jnp, c3a_jax as c3a
  >>> params = {"query": {"kernel": jnp.ones((64, 64)), "bias": jnp.zeros(64)}}
  >>> cfg = c3a.C3AConfig(block_size=16, target_modules=["query"])
  >>> print(c3a.summary(c3a.attach(params, cfg, jax.random.key(0)), cfg))
  trainable params: 256 || all params: 4,416 || trainable%: 5.7971
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from c3a_jax import _nnx, _tree
from c3a_jax._config import C3AConfig
from c3a_jax._labels import label


@dataclasses.dataclass(frozen=True)
class Summary:
  """Trainable and total parameter counts; ``layers`` lists each trainable leaf when asked."""

  trainable: int
  total: int
  layers: tuple[tuple[str, str, tuple[int, ...], int], ...] = ()  # (leaf path, label, shape, n)

  @property
  def share(self) -> float:
    """Trainable parameters as a fraction of all (adapter included, as PEFT counts)."""
    return self.trainable / self.total if self.total else 0.0

  def __str__(self) -> str:
    lines = [
      f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
      f"trainable%: {100 * self.share:.4f}"
    ]
    if self.layers:
      width = max(len(p) for p, *_ in self.layers)
      lines += [f"  {p:<{width}}  {lab:<15} {s!s:<16} {n:>12,}" for p, lab, s, n in self.layers]
    return "\n".join(lines)


def summary(params: Mapping, cfg: C3AConfig | None = None, *, per_layer: bool = False) -> Summary:
  """Counts the parameters ``cfg`` trains (C3A kernels only without ``cfg``) and all of them.

  ``params`` is a params tree or an NNX model (its ``nnx.Param`` values count).
  """
  if _nnx.is_module(params):
    params = _nnx.view(params).tree
  trainable = total = 0
  layers = []
  for path, name, value in _tree.leaves(params):
    shape = _tree.shape(value)
    n = math.prod(shape)
    total += n
    lab = label(params, path, name, cfg)
    if lab != "frozen":
      trainable += n
      if per_layer:
        layers.append((f"{path}.{name}" if path else name, lab, shape, n))
  return Summary(trainable, total, tuple(layers))
