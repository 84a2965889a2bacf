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

import optax

from c3a_jax import _tree
from c3a_jax._config import C3AConfig
from c3a_jax._labels import labels


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
  return optax.multi_transform(transforms, lambda p: labels(p, cfg))
