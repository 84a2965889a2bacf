"""Nested-dict helpers for Flax params trees, addressed by dotted module paths."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

Params = dict[str, Any]


def to_dict(tree: Any) -> Any:
  """A fresh nested ``dict`` (FrozenDicts and other mappings included); leaves are shared."""
  if isinstance(tree, Mapping):
    return {k: to_dict(v) for k, v in tree.items()}
  return tree


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


def prune(tree: Mapping) -> dict:
  """``tree`` without empty sub-dicts."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      value = prune(value)
      if not value:
        continue
    out[key] = value
  return out


def shape(x: Any) -> tuple[int, ...]:
  return tuple(np.shape(x))
