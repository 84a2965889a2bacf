"""The offline default task: scikit-learn's handwritten digits, no network needed.

A small MLP is first trained on digits 0-4 (and cached); fine-tuning then teaches it digits
5-9 from a few hundred examples, with a fresh 5-way head. Head-only training must make do with
the 0-4 features; C3A adapts the hidden layers too, for a small fraction of full fine-tuning's
parameters.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from c3a_jax.cli.job import Job, Log, batches
from c3a_jax.io import atomic_write

HIDDEN = 128
PRETRAIN_STEPS, PRETRAIN_LR = 600, 3e-3
FINETUNE_TRAIN = 250  # examples of digits 5-9 to learn from; the rest are held out


class DigitsMLP(nn.Module):
  """8x8 images (64 pixels) -> two hidden layers -> ``classes`` logits."""

  classes: int = 5

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(HIDDEN, name="fc0")(x))
    x = nn.relu(nn.Dense(HIDDEN, name="fc1")(x))
    return nn.Dense(self.classes, name="head")(x)


def _split() -> dict[str, dict[str, np.ndarray]]:
  from sklearn.datasets import load_digits  # ships its data: no download

  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(y))
  x, y = x[order], y[order]
  old, new = y < 5, y >= 5
  xn, yn = x[new], y[new] - 5
  return {
    "pretrain": {"x": x[old], "labels": y[old]},
    "train": {"x": xn[:FINETUNE_TRAIN], "labels": yn[:FINETUNE_TRAIN]},
    "eval": {"x": xn[FINETUNE_TRAIN:], "labels": yn[FINETUNE_TRAIN:]},
  }


def cache_dir() -> str:
  """``$C3A_JAX_CACHE``, else ``$XDG_CACHE_HOME/c3a-jax`` (``~/.cache/c3a-jax``)."""
  default = os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "c3a-jax"
  )
  return os.environ.get("C3A_JAX_CACHE", default)


def pretrained_params(log: Log = print) -> Any:
  """The MLP trained on digits 0-4, from the cache or trained now (a few seconds) and cached.

  The cache file carries its params' SHA-256: a damaged one (cut short, or a flipped bit that
  would change the model silently) is retrained and cached again, with a warning naming it.
  """
  # v2: the file holds {"sha256", "params"}; a v1 file (no hash) is never read.
  recipe = f"digits-mlp-{HIDDEN}-{PRETRAIN_STEPS}-{PRETRAIN_LR}-v2"
  path = os.path.join(cache_dir(), hashlib.sha1(recipe.encode()).hexdigest()[:12] + ".msgpack")
  model = DigitsMLP()
  template = model.init(jax.random.key(0), jnp.ones((1, 64)))["params"]
  if not os.path.isfile(path):
    log(f"pretraining the digits MLP on digits 0-4 (cached in {path})")
  else:
    payload, problem = _read_cache(path)
    if problem is None:
      return flax.serialization.from_bytes(template, payload)
    # The cache is c3a-jax's own and retrains the same in seconds: rebuild it, and say so.
    log(
      f"warning: the cached digits model {path} is damaged ({problem}); retraining it "
      "(a few seconds) and caching it again"
    )
  params = _pretrain(model, template)
  payload = flax.serialization.to_bytes(params)
  record = {"sha256": hashlib.sha256(payload).hexdigest(), "params": payload}
  atomic_write(path, flax.serialization.msgpack_serialize(record))
  return params


def _read_cache(path: str) -> tuple[bytes | None, str | None]:
  """(the serialized params, None), or (None, what is wrong with the file at ``path``)."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    record = flax.serialization.msgpack_restore(data)
    payload = record["params"]
    digest = hashlib.sha256(payload).hexdigest()
  except Exception as e:  # msgpack raises several kinds for a damaged file
    return None, f"it does not read: {type(e).__name__}"
  if digest != record.get("sha256"):
    return None, "its content hash does not match"
  return payload, None


def _pretrain(model: DigitsMLP, template: Any) -> Any:
  data = _split()["pretrain"]
  tx = optax.adam(PRETRAIN_LR)

  @jax.jit
  def step(params, opt_state, batch):
    def loss(p):
      logits = model.apply({"params": p}, batch["x"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = template, tx.init(template)
  for _, batch in zip(range(PRETRAIN_STEPS), batches(data, 64, seed=0), strict=False):
    params, opt_state = step(params, opt_state, batch)
  return params


def job(seed: int = 0, log: Log = print) -> Job:
  """Fine-tuning on digits 5-9: the pretrained body and a fresh 5-way head."""
  split = _split()
  model = DigitsMLP()
  params = dict(pretrained_params(log))
  params["head"] = model.init(jax.random.key(seed + 1), jnp.ones((1, 64)))["params"]["head"]

  def logits_fn(params, batch, rng, train):
    return model.apply({"params": params}, batch["x"])

  return Job(
    logits_fn=logits_fn,
    params=params,
    train_data=split["train"],
    eval_data=split["eval"],
    kind="classify",
  )
