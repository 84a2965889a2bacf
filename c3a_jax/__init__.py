"""c3a-jax: C3A (Circular Convolution Adaptation) fine-tuning for JAX and Flax.

Numerically interchangeable with Hugging Face PEFT's C3A: adapters move both ways.
"""

from c3a_jax import ops
from c3a_jax.checkpoint import Checkpointer
from c3a_jax.config import C3AConfig
from c3a_jax.intercept import intercept, wrap
from c3a_jax.optim import labels, optimizer
from c3a_jax.peft_io import load_adapter, save_adapter
from c3a_jax.sharding import batch_sharding, make_mesh, param_shardings, shard_batch
from c3a_jax.summary import Summary, summary
from c3a_jax.targets import Target, select
from c3a_jax.train import Throughput, TrainState, compiled_memory, make_train_step
from c3a_jax.transform import attach, combine, merge, split, unmerge

__version__ = "0.1.0"

__all__ = [
    "C3AConfig",
    "Checkpointer",
    "Summary",
    "Target",
    "Throughput",
    "TrainState",
    "attach",
    "batch_sharding",
    "combine",
    "compiled_memory",
    "intercept",
    "labels",
    "load_adapter",
    "make_mesh",
    "make_train_step",
    "merge",
    "ops",
    "optimizer",
    "param_shardings",
    "save_adapter",
    "select",
    "shard_batch",
    "split",
    "summary",
    "unmerge",
    "wrap",
]
