"""c3a-jax: C3A (Circular Convolution Adaptation) fine-tuning for JAX and Flax.

Numerically interchangeable with Hugging Face PEFT's C3A: adapters move both ways.

The library is pure functions of a Flax params tree: :func:`attach` adds C3A kernels,
:func:`intercept` runs the model with them, :func:`split` / :func:`combine` separate what
trains, :func:`merge` folds them in, :func:`save_adapter` / :func:`load_adapter` speak PEFT's
format. :mod:`c3a_jax.ops` is the math; :mod:`c3a_jax.training` the training step, meshes,
checkpoints and counters; :mod:`c3a_jax.io` files written whole; :mod:`c3a_jax.cli` the
``c3a-jax`` command.
"""

import sys

from c3a_jax import _compat, io, key_maps, ops, quantize, training, tree
from c3a_jax._adapters import replace_slot, stack_adapters, weighted_sum
from c3a_jax._config import C3AConfig
from c3a_jax._hf_merge import merge_checkpoint
from c3a_jax._intercept import intercept, intercepted
from c3a_jax._labels import labels
from c3a_jax._lora_export import LoraExport, to_lora
from c3a_jax._nnx import C3AParam, nnx_params, register_layer, set_nnx_params
from c3a_jax._optim import optimizer
from c3a_jax._peft_io import load_adapter, save_adapter
from c3a_jax._summary import Summary, summary
from c3a_jax._targets import Target, UnmatchedTargetWarning, default_targets, select
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
  "default_targets",
  "intercept",
  "intercepted",
  "io",
  "key_maps",
  "labels",
  "load_adapter",
  "make_train_step",
  "merge",
  "merge_checkpoint",
  "nnx_params",
  "ops",
  "optimizer",
  "quantize",
  "register_layer",
  "replace_slot",
  "save_adapter",
  "select",
  "set_nnx_params",
  "split",
  "stack_adapters",
  "summary",
  "to_lora",
  "training",
  "tree",
  "unmerge",
  "weighted_sum",
]


def __getattr__(name: str) -> object:
  # Old names (c3a_jax.make_mesh, c3a_jax.wrap, ...) work, with a warning, until their release
  # in _compat.
  return _compat.old_attribute(name, sys.modules[__name__])
