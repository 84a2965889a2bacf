"""Which group trains each leaf of a params tree under a C3AConfig, or that it stays frozen.

Example:
  >>> import jax, jax.numpy as jnp, c3a_jax as c3a
  >>> params = {"query": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)},
  ...           "classifier": {"kernel": jnp.ones((8, 2)), "bias": jnp.zeros(2)}}
  >>> cfg = c3a.C3AConfig(block_size=4, target_modules=["query"], modules_to_save=["classifier"])
  >>> params = c3a.attach(params, cfg, jax.random.key(0))
  >>> sorted(c3a.labels(params, cfg)["query"].items())
  [('bias', 'frozen'), ('c3a_kernel', 'c3a'), ('kernel', 'frozen')]
  >>> c3a.labels(params, cfg)["classifier"]["kernel"]
  'modules_to_save'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import jax

from c3a_jax import _qwix, _tree
from c3a_jax._config import C3AConfig
from c3a_jax._layout import C3A_LEAVES
from c3a_jax._targets import trains_fully

Label = Literal["c3a", "modules_to_save", "bias", "frozen"]


def label(params: Mapping, path: str, name: str, cfg: C3AConfig | None = None) -> Label:
  """The label of leaf ``name`` of module ``path``: which group trains it, or ``"frozen"``."""
  if name in C3A_LEAVES:
    return "c3a"
  if cfg is None:
    return "frozen"
  if cfg.modules_to_save and trains_fully(path, cfg):
    return "modules_to_save"
  if name == "bias" and (
    cfg.bias == "all"
    or (cfg.bias == "c3a_only" and any(n in _tree.get(params, path) for n in C3A_LEAVES))
  ):
    return "bias"
  return "frozen"


def labels(params: Mapping, cfg: C3AConfig | None = None) -> Any:
  """A tree shaped like ``params`` (same container types) holding each leaf's :func:`label`;
  a Flax box (``nn.Partitioned``) or a Qwix-quantized weight counts as one leaf, so the result
  is a prefix of ``params``, as optax's ``partition`` and ``masked`` take it."""

  def one(path, _):
    keys = [getattr(k, "key", k) for k in path]
    return label(params, ".".join(keys[:-1]), keys[-1], cfg)

  def is_leaf(x):
    return _tree.is_box(x) or _qwix.is_quantized(x)

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_leaf)
