"""c3a-jax: C3A (Circular Convolution Adaptation) fine-tuning for JAX and Flax.

Numerically interchangeable with Hugging Face PEFT's C3A: adapters move both ways.

The library is pure functions of a Flax params tree: :func:`attach` adds C3A kernels,
:func:`intercept` runs the model with them, :func:`split` / :func:`combine` separate what
trains, :func:`merge` folds them in, :func:`save_adapter` / :func:`load_adapter` speak PEFT's
format. :mod:`c3a_jax.ops` is the math; :mod:`c3a_jax.training` the training step, meshes,
checkpoints and counters; :mod:`c3a_jax.cli` the ``c3a-jax`` command.
"""

import warnings as _warnings

from c3a_jax import key_maps, ops, training
from c3a_jax._adapters import replace_slot, stack_adapters, weighted_sum
from c3a_jax._config import C3AConfig
from c3a_jax._hf_merge import merge_checkpoint
from c3a_jax._intercept import intercept, wrap
from c3a_jax._labels import labels
from c3a_jax._lora_export import LoraExport, to_lora
from c3a_jax._nnx import C3AParam, register_layer
from c3a_jax._optim import optimizer
from c3a_jax._peft_io import load_adapter, save_adapter
from c3a_jax._summary import Summary, summary
from c3a_jax._targets import Target, UnmatchedTargetWarning, select
from c3a_jax._transform import attach, combine, merge, split, unmerge
from c3a_jax.training import TrainState, make_train_step

__version__ = "0.2.0"

__all__ = [
  "C3AConfig",
  "C3AParam",
  "LoraExport",
  "Summary",
  "Target",
  "TrainState",
  "UnmatchedTargetWarning",
  "attach",
  "combine",
  "intercept",
  "key_maps",
  "labels",
  "load_adapter",
  "make_train_step",
  "merge",
  "merge_checkpoint",
  "ops",
  "optimizer",
  "register_layer",
  "replace_slot",
  "save_adapter",
  "select",
  "split",
  "stack_adapters",
  "summary",
  "to_lora",
  "training",
  "unmerge",
  "weighted_sum",
  "wrap",
]

# Names that moved to c3a_jax.training in 0.2; the old spelling works for one release.
_MOVED_TO_TRAINING = (
  "Checkpointer",
  "Throughput",
  "batch_sharding",
  "compiled_memory",
  "make_mesh",
  "param_shardings",
  "shard_batch",
)


def __getattr__(name: str) -> object:
  if name in _MOVED_TO_TRAINING:
    _warnings.warn(
      f"c3a_jax.{name} is deprecated; use c3a_jax.training.{name}", DeprecationWarning, stacklevel=2
    )
    return getattr(training, name)
  raise AttributeError(f"module 'c3a_jax' has no attribute {name!r}")
