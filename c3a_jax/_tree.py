"""Nested-dict helpers for Flax params trees, addressed by dotted module paths.

Flax boxes (``nn.Partitioned`` and kin) are leaves here, read through where a shape is asked.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from flax.core import meta

Params = dict[str, Any]


def to_dict(tree: Any, prefix: str = "") -> Any:
  """A fresh nested ``dict`` (FrozenDicts and other mappings included); leaves are shared.

  Keys must be strings without dots: they are joined with dots into module paths.
  """
  if not isinstance(tree, Mapping):
    return tree
  for k in tree:
    if not isinstance(k, str) or "." in k:
      raise ValueError(
        f"params key {k!r} under {prefix or 'the root'!r}: c3a_jax needs string "
        "keys without dots (Flax params have them), as paths join keys with dots"
      )
  return {k: to_dict(v, f"{prefix}{k}.") for k, v in tree.items()}


def modules(tree: Mapping, prefix: str = "") -> Iterator[tuple[str, Mapping]]:
  """Every sub-dict of ``tree`` with its dotted path, parents before children."""
  for key, value in tree.items():
    if isinstance(value, Mapping):
      path = f"{prefix}{key}"
      yield path, value
      yield from modules(value, path + ".")


def leaves(tree: Mapping, prefix: str = "") -> Iterator[tuple[str, str, Any]]:
  """Every leaf as ``(module path, leaf name, value)``; the module path of a root leaf is ''."""
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield prefix[:-1], key, value


def get(tree: Mapping, path: str) -> Any:
  """The node at dotted ``path``; KeyError naming the first missing segment."""
  node = tree
  for i, key in enumerate(path.split(".") if path else ()):
    if not isinstance(node, Mapping) or key not in node:
      raise KeyError(".".join(path.split(".")[: i + 1]))
    node = node[key]
  return node


def set_leaf(tree: dict, path: str, name: str, value: Any) -> None:
  """Sets ``tree[path...][name] = value`` in place, making missing parents."""
  node = tree
  for key in path.split(".") if path else ():
    node = node.setdefault(key, {})
  node[name] = value


def is_box(x: Any) -> bool:
  """A Flax box (``nn.Partitioned``, ``nn.LogicallyPartitioned``): one leaf to c3a's trees."""
  return isinstance(x, meta.AxisMetadata)


def unbox(x: Any) -> Any:
  """The array inside a Flax box, or ``x``."""
  return x.unbox() if is_box(x) else x


def shape(x: Any) -> tuple[int, ...]:
  """The shape of a leaf, boxed or not."""
  return tuple(np.shape(unbox(x)))
