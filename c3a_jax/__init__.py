"""c3a-jax: C3A (Circular Convolution Adaptation) fine-tuning for JAX and Flax.

Numerically interchangeable with Hugging Face PEFT's C3A: adapters move both ways.
"""

from c3a_jax import ops
from c3a_jax.config import C3AConfig
from c3a_jax.intercept import intercept, wrap
from c3a_jax.optim import labels, optimizer
from c3a_jax.peft_io import load_adapter, save_adapter
from c3a_jax.summary import Summary, summary
from c3a_jax.targets import Target, select
from c3a_jax.transform import attach, combine, merge, split, unmerge

__version__ = "0.1.0"

__all__ = [
    "C3AConfig",
    "Summary",
    "Target",
    "attach",
    "combine",
    "intercept",
    "labels",
    "load_adapter",
    "merge",
    "ops",
    "optimizer",
    "save_adapter",
    "select",
    "split",
    "summary",
    "unmerge",
    "wrap",
]
