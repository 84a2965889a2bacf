"""An optax optimizer that trains only what a C3AConfig makes trainable.

Example:
  >>> import jax, jax.numpy as jnp, optax, c3a_jax as c3a
  >>> params = {"query": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)},
  ...           "classifier": {"kernel": jnp.ones((8, 2)), "bias": jnp.zeros(2)}}
  >>> cfg = c3a.C3AConfig(block_size=4, target_modules=["query"], modules_to_save=["classifier"])
  >>> params = c3a.attach(params, cfg, jax.random.key(0))
  >>> tx = c3a.optimizer(optax.adamw(1e-1), params, cfg, head_tx=optax.adamw(4e-6))
  >>> state = tx.init(params)   # moments for c3a_kernel and the classifier only
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
import optax

from c3a_jax import _tree
from c3a_jax._config import C3AConfig
from c3a_jax._labels import labels
from c3a_jax._layout import C3A_LEAVES, rebox
from c3a_jax._targets import stack_layers


def optimizer(
  tx: optax.GradientTransformation,
  params: Mapping,
  cfg: C3AConfig,
  *,
  head_tx: optax.GradientTransformation | None = None,
) -> optax.GradientTransformation:
  """Wraps ``tx`` so that it trains only what ``cfg`` makes trainable, in a one-tree setup.

  C3A kernels and the biases ``cfg.bias`` names are updated by ``tx``; ``cfg.modules_to_save``
  subtrees by ``head_tx`` (default ``tx``), e.g. the paper's 3e-1 for C3A and 4e-6 for the
  head. Frozen leaves get zero updates, no optimizer state and no weight decay.

  Args:
    tx: the optimizer for the C3A kernels (and trained biases).
    params: the params tree (with C3A kernels) the optimizer will see.
    cfg: the config the kernels were attached with.
    head_tx: the optimizer for ``modules_to_save``.
  """
  tree = labels(params, cfg)
  if all(v == "frozen" for _, _, v in _tree.leaves(tree)):
    raise ValueError(
      "optimizer: nothing in params is trainable; call c3a.attach(params, cfg, rng) "
      "first (or set modules_to_save / bias)"
    )
  transforms = {
    "c3a": tx,
    "bias": tx,
    "modules_to_save": head_tx or tx,
    "frozen": optax.set_to_zero(),
  }
  tx = optax.multi_transform(transforms, lambda p: labels(p, cfg))
  masks = stack_masks(params, cfg)
  return optax.chain(tx, _keep_zero(masks)) if masks else tx


def stack_masks(params: Mapping, cfg: C3AConfig) -> dict[str, np.ndarray]:
  """For each stacked C3A kernel of which ``layers_to_transform`` adapts some layers only, a
  ``(L,)`` mask of those layers, by leaf path."""
  if cfg.layers_to_transform in (None, ()):
    return {}
  masks = {}
  for path, name, value in _tree.leaves(params):
    shape = _tree.shape(value)
    if name in C3A_LEAVES and len(shape) == 4:
      layers = stack_layers(path, shape[0], cfg)
      if len(layers) < shape[0]:
        masks[f"{path}.{name}"] = np.isin(np.arange(shape[0]), layers).astype(np.float32)
  return masks


def _keep_zero(masks: dict[str, np.ndarray]) -> optax.GradientTransformation:
  """Zeroes the updates of the stack layers ``layers_to_transform`` leaves out."""

  def update(updates, state, params=None):
    def one(path, u):
      mask = masks.get(".".join(str(getattr(k, "key", k)) for k in path))
      if mask is None:
        return u
      return rebox(u, _tree.unbox(u) * mask[:, None, None, None])

    return jax.tree_util.tree_map_with_path(one, updates, is_leaf=_tree.is_box), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)
