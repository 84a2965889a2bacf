"""A Job: what the runner trains. A model function, its base params, and the data as arrays.

Built by :mod:`c3a_jax.cli.digits` (the offline default) and :mod:`c3a_jax.cli.hub` (Hugging Face
models and datasets); consumed by :func:`c3a_jax.cli.runner.run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from c3a_jax import intercept
from c3a_jax.cli.experiment import Experiment, QuantizeSpec
from c3a_jax.tree import is_quantized

Batch = dict[str, np.ndarray]
Log = Callable[[str], None]  # where progress messages go (stderr in the CLI)


@dataclasses.dataclass
class Job:
  """``logits_fn(params, batch, rng, train)``; ``train_data``/``eval_data`` map names to arrays
  with a shared leading axis; ``kind`` picks the loss: ``"classify"`` (``batch["labels"]``) or
  ``"lm"`` (next-token prediction over ``batch["input_ids"]`` where ``batch["loss_mask"]``)."""

  logits_fn: Callable[..., jax.Array]
  params: Any
  train_data: Batch
  eval_data: Batch | None
  kind: str = "classify"
  model_type: str | None = None
  tokens_per_example: int = 1
  save_merged: Callable[[Any, str], None] | None = None  # writes a merged model directory
  # For models whose layers c3a reads from the model, not the params tree (Tunix's NNX models):
  attach: Callable[[Any, Any, jax.Array], Any] | None = None  # (params, cfg, rng) -> params
  key_map: Any = None  # the model's module paths -> PEFT's names, for the adapter files
  base_checkpoint: str | None = None  # merge writes this Hugging Face checkpoint, adapted
  # How Qwix stores the frozen base (model.quantize), in words, e.g. "int8 (tile 32), Qwix PTQ,
  # every linear layer but classifier: 24 weights"; None: as loaded.
  quantized: str | None = None

  def loss(
    self, params: Any, batch: Batch, rng: jax.Array | None, train: bool
  ) -> tuple[jax.Array, dict]:
    """Mean loss and metrics (accuracy) of ``batch``."""
    losses, correct, counts = self.row_stats(params, batch, rng, train)
    denom = jnp.maximum(counts.sum(), 1.0)
    return losses.sum() / denom, {"accuracy": correct.sum() / denom}

  def row_stats(
    self, params: Any, batch: Batch, rng: jax.Array | None = None, train: bool = False
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per example: summed loss, correct predictions, and what was scored (1 for a class;
    the tokens under ``loss_mask`` for ``"lm"``)."""
    logits = self.logits_fn(params, batch, rng, train).astype(jnp.float32)
    if self.kind == "classify":
      labels = batch["labels"]
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return losses, (logits.argmax(-1) == labels).astype(jnp.float32), jnp.ones_like(losses)
    targets, mask = batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:].astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
    correct = (logits[:, :-1].argmax(-1) == targets) * mask
    return (losses * mask).sum(-1), correct.sum(-1), mask.sum(-1)

  @property
  def num_train(self) -> int:
    return len(next(iter(self.train_data.values())))

  @functools.cached_property
  def num_outputs(self) -> int:
    """The size of the model's last logits axis (its classes, or its vocabulary), from shapes."""
    one = {k: v[:1] for k, v in self.train_data.items()}
    logits = jax.eval_shape(lambda p, b: self.logits_fn(p, b, None, False), self.params, one)
    return logits.shape[-1]

  @functools.cached_property
  def eval_stats(self) -> Callable[..., tuple[jax.Array, ...]]:
    """``(params, batch, index=None) -> row_stats``, jitted once per job, under the
    interceptor; ``index`` gives each row's adapter where the params hold a set of them."""

    @jax.jit
    def stats(params, batch, index=None):
      with intercept(adapter_index=index):
        return self.row_stats(params, batch)

    return stats


def quantized_paths(params: Any) -> list[str]:
  """The ``/``-joined paths of the weights in ``params`` that Qwix quantized."""
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
  return ["/".join(str(getattr(k, "key", k)) for k in path) for path, x in flat if is_quantized(x)]


@contextlib.contextmanager
def quantize_errors(spec: QuantizeSpec) -> Iterator[None]:
  """Qwix's errors while quantizing (a tile that does not divide a layer's input, a missing
  Qwix) as one line naming the settings."""
  try:
    yield
  except ImportError as e:
    raise ValueError(
      f'model.quantize needs Qwix ({e.name} is not installed): pip install "c3a-jax[tunix]"'
    ) from None
  except (ValueError, TypeError) as e:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    hint = ""
    if "conv_general_dilated" in first:  # Qwix quantizes a convolution's weights only with
      hint = (  # its activations: a ViT's patch embedding, say
        "; leave the convolutions out with model.quantize.module_path (a regex over layer "
        "paths; for a ViT: '(?!.*(patch_embeddings|classifier)).*')"
      )
    raise ValueError(
      f"model.quantize (weights={spec.weights}, tile_size={spec.tile_size}): Qwix could not "
      f"quantize the base: {first}{hint}"
    ) from None


def quantize_rule(exp: Experiment) -> str:
  """The regex over layer paths that ``model.quantize`` quantizes in ``exp``'s model."""
  return exp.model.quantize.rule_path(exp.c3a.modules_to_save, exp.model.library)


def describe_quantized(exp: Experiment, params: Any) -> str:
  """How ``model.quantize`` stored the base ``params`` (quantized), in words, with how many
  weights; a ValueError where its ``module_path`` matched no layer."""
  spec, trained = exp.model.quantize, exp.c3a.modules_to_save
  paths = quantized_paths(params)
  if not paths:
    kernels = list(_kernel_paths(params))[:3]
    raise ValueError(
      f"model.quantize.module_path {quantize_rule(exp)!r} matches none of the model's "
      f"linear layers, so nothing would be quantized (their paths: {', '.join(kernels)}, ...)"
    )
  return f"{spec.describe(trained, exp.model.library)}: {len(paths)} weights"


def _kernel_paths(params: Any) -> Iterator[str]:
  """The ``/``-joined paths of the modules in ``params`` that hold a matrix (a ``kernel``, or
  Gemma's einsum ``w``), as Qwix's ``module_path`` sees them."""
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
  for path, x in flat:
    keys = [str(getattr(k, "key", k)) for k in path]
    if keys and keys[-1] in ("kernel", "w") and np.ndim(x) >= 2:
      yield "/".join(keys[:-1])


def batches(data: Batch, batch_size: int, seed: int, start: int = 0) -> Iterator[Batch]:
  """Batch ``start``, ``start + 1``, ...: epochs of a seeded shuffle, so any position can be
  rebuilt exactly on resume. Partial final batches are dropped."""
  n = len(next(iter(data.values())))
  per_epoch = n // batch_size
  if per_epoch == 0:
    raise ValueError(f"batch size {batch_size} is larger than the {n} training examples")
  position, epoch, order = start, None, None
  while True:
    if position // per_epoch != epoch:
      epoch = position // per_epoch
      order = np.random.default_rng([seed, epoch]).permutation(n)
    index = position % per_epoch
    idx = order[index * batch_size : (index + 1) * batch_size]
    yield {k: v[idx] for k, v in data.items()}
    position += 1


def eval_batches(data: Batch, batch_size: int) -> Iterator[Batch]:
  """Every example once, in order; the last batch may be smaller."""
  n = len(next(iter(data.values())))
  for i in range(0, n, batch_size):
    yield {k: v[i : i + batch_size] for k, v in data.items()}
