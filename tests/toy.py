"""A small adapted MLP and its data, shared by the training tests and the multi-host worker."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import c3a_jax as c3a

D, HIDDEN, CLASSES = 16, 32, 4
CFG = c3a.C3AConfig(
  block_size=8, target_modules=["fc0", "fc1"], modules_to_save=["head"], init_weights="gaussian"
)


class MLP(nn.Module):
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, *, rng=None):
    x = nn.gelu(nn.Dense(HIDDEN, name="fc0")(x))
    if self.dropout:
      x = nn.Dropout(self.dropout, deterministic=rng is None)(x, rng=rng)
    x = nn.gelu(nn.Dense(HIDDEN, name="fc1")(x))
    return nn.Dense(CLASSES, name="head")(x)


def params(seed=0):
  p = MLP().init(jax.random.key(seed), jnp.ones((1, D)))["params"]
  return c3a.attach(p, CFG, jax.random.key(seed + 1))


def data(n=64, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, D)).astype(np.float32)
  return {"x": x, "y": (x[:, 0] > 0).astype(np.int32) + 2 * (x[:, 1] > 0)}


def loss_fn(model=MLP()):
  def loss(params, batch, rng):
    logits = model.apply({"params": params}, batch["x"], rng=rng if model.dropout else None)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  return loss


def tx():
  return c3a.optimizer(optax.adam(3e-2), params(), CFG, head_tx=optax.adam(1e-2))
