"""A training step for C3A: gradients for the trainable tree only, from one CPU to many hosts.

Two patterns, one builder:

* split (efficient): ``state.params`` is the adapter from :func:`c3a_jax.split`; the frozen base
  is passed beside it and gets no gradient and no optimizer state.
* one tree: ``state.params`` is the whole params tree, ``base`` is ``None`` and ``tx`` comes
  from :func:`c3a_jax.optimizer` (frozen leaves get zero updates).

``loss_fn(params, batch, rng)`` returns a scalar loss, or ``(loss, aux_dict)``; it runs under
:func:`c3a_jax.intercept`, so it just applies the model. ``compute_dtype=jnp.bfloat16`` casts
the frozen weights to bfloat16 (the model's own ``dtype`` decides its activations' dtype); the
C3A kernels stay float32, and the FFT runs in float32.

Example:
  >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, c3a_jax as c3a
  >>> model = nn.Dense(8)
  >>> params = {"fc": model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]}
  >>> cfg = c3a.C3AConfig(block_size=4, target_modules=["fc"])
  >>> adapter, base = c3a.split(c3a.attach(params, cfg, jax.random.key(1)))
  >>> def loss_fn(params, batch, rng):
  ...   return jnp.mean((model.apply({"params": params["fc"]}, batch["x"]) - batch["y"]) ** 2)
  >>> tx = optax.adam(1e-1)
  >>> step = jax.jit(c3a.training.make_train_step(loss_fn, tx, grad_accum=2))
  >>> state = c3a.training.TrainState.create(adapter, tx, rng=0)
  >>> batch = {"x": jnp.ones((4, 8)), "y": jnp.zeros((4, 8))}
  >>> state, metrics = step(state, base, batch)
  >>> int(state.step), sorted(metrics)
  (1, ['grad_norm', 'loss'])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

import c3a_jax as c3a  # the library's public names, read at call time: c3a_jax imports training
from c3a_jax import ops
from c3a_jax.tree import C3A_LEAVES, is_quantized

LossFn = Callable[[Any, Any, jax.Array], jax.Array | tuple[jax.Array, dict]]


class TrainState(struct.PyTreeNode):
  """What changes during training: all of it is checkpointed, none of the frozen base is."""

  step: jax.Array
  params: Any  # the adapter (split pattern) or the whole params tree (one-tree pattern)
  opt_state: optax.OptState
  rng: jax.Array  # raw PRNG key data (uint32), so checkpoints hold plain arrays

  @classmethod
  def create(
    cls, params: Any, tx: optax.GradientTransformation, rng: int | jax.Array = 0
  ) -> TrainState:
    """A fresh state; ``rng`` is a seed or a PRNG key (used for dropout)."""
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      key = jax.random.key_data(key)
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=key)


def cast_frozen(tree: Any, dtype: Any) -> Any:
  """Floating leaves of ``tree`` in ``dtype``, except C3A kernels (they stay float32) and
  quantized weights (their values and scales are Qwix's to keep)."""

  def cast(path, x):
    name = getattr(path[-1], "key", None) if path else None
    if (
      name in C3A_LEAVES or is_quantized(x) or not jnp.issubdtype(jnp.result_type(x), jnp.floating)
    ):
      return x
    return jnp.asarray(x, dtype)

  return jax.tree_util.tree_map_with_path(cast, tree, is_leaf=is_quantized)


def _split_micro(batch: Any, n: int) -> Any:
  def split(path, x):
    if np.ndim(x) == 0 or np.shape(x)[0] % n:
      raise ValueError(
        f"grad_accum={n} does not divide batch leaf "
        f"{jax.tree_util.keystr(path) or 'batch'} of shape {np.shape(x)}"
      )
    return x.reshape(n, x.shape[0] // n, *x.shape[1:])

  return jax.tree_util.tree_map_with_path(split, batch)


def make_train_step(
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  *,
  grad_accum: int = 1,
  compute_dtype: Any | None = None,
  axis_name: str | None = None,
  strategy: ops.Strategy = "auto",
) -> Callable[[TrainState, Any, Any], tuple[TrainState, dict]]:
  """Builds ``step(state, base, batch) -> (state, metrics)``, pure and ready for ``jax.jit``.

  Args:
    loss_fn: ``(params, batch, rng) -> loss | (loss, aux)``, run under the C3A interceptor.
    tx: the optimizer (e.g. ``c3a.optimizer(...)`` for the one-tree pattern).
    grad_accum: micro-batches per step; the batch's leading axis is split into this many and
      their gradients averaged (a ``lax.scan``: activation memory of one micro-batch).
    compute_dtype: e.g. ``jnp.bfloat16``: the frozen weights are cast to it for the forward
      pass; C3A kernels, gradients and optimizer state stay float32. Pass a base already cast
      with :func:`cast_frozen` to skip the cast inside every step (it is then a no-op).
    axis_name: the ``jax.pmap`` axis to average gradients over. Not needed with sharded ``jit``.
    strategy: how the C3A delta is computed (see :func:`c3a_jax.intercept`); same values.
  """
  if not isinstance(grad_accum, int) or grad_accum < 1:
    raise ValueError(f"grad_accum must be a positive integer, got {grad_accum!r}")
  strategy = ops.check_strategy(strategy, "make_train_step")  # here, not at the first trace

  def forward(trainable, base, batch, rng):
    if base is None:
      params = trainable if compute_dtype is None else cast_frozen(trainable, compute_dtype)
    else:
      params = c3a.combine(trainable, base)
    with c3a.intercept(strategy):
      out = loss_fn(params, batch, rng)
    loss, aux = out if isinstance(out, tuple) else (out, {})
    return loss.astype(jnp.float32), aux

  grad_fn = jax.value_and_grad(forward, has_aux=True)

  def step(state: TrainState, base: Any, batch: Any) -> tuple[TrainState, dict]:
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    if axis_name is not None:
      step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))
    if base is not None and compute_dtype is not None:
      base = cast_frozen(base, compute_dtype)  # once per step, outside the gradient
    if grad_accum == 1:
      (loss, aux), grads = grad_fn(state.params, base, batch, step_rng)
    else:

      def micro(carry, xs):
        i, mb = xs
        (loss, aux), g = grad_fn(state.params, base, mb, jax.random.fold_in(step_rng, i))
        return jax.tree.map(jnp.add, carry, (g, loss)), aux

      zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32))
      (grads, loss), aux = jax.lax.scan(
        micro, zeros, (jnp.arange(grad_accum), _split_micro(batch, grad_accum))
      )
      grads, loss = jax.tree.map(lambda g: g / grad_accum, (grads, loss))
      aux = jax.tree.map(lambda a: a.mean(0), aux)
    if axis_name is not None:
      grads, loss, aux = jax.lax.pmean((grads, loss, aux), axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = state.replace(
      step=state.step + 1,
      params=optax.apply_updates(state.params, updates),
      opt_state=opt_state,
      rng=jax.random.key_data(rng),
    )
    return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}

  return step
