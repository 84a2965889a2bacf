"""Every deprecated name and old format c3a-jax still reads, each with the release that drops it.

The rest of the package spells no old name: ``c3a_jax.__getattr__``, ``ops.check_strategy``,
``C3AConfig.from_dict``, the ``Checkpointer`` and the command's config reader call in here, so
removing a deprecation is deleting its entry here and the one call. Deprecations last one
release (CHANGELOG.md); ``tests/test_compat.py`` fails once ``c3a_jax.__version__`` reaches an
entry's release. This module imports nothing from c3a_jax, so every layer may use it, ``ops``
included.

Example:
  >>> import warnings
  >>> from c3a_jax import _compat
  >>> with warnings.catch_warnings(record=True) as caught:
  ...   warnings.simplefilter("always")
  ...   _compat.renamed_strategy("merged", "intercept")
  'fold'
  >>> print(caught[0].message)
  intercept: strategy='merged' is deprecated; it is now called 'fold' (c3a-jax 0.3 drops 'merged')
"""

from __future__ import annotations

import warnings
from typing import Any

MOVED_TO_TRAINING: dict[str, str] = dict.fromkeys(
  (
    "Checkpointer",
    "Throughput",
    "batch_sharding",
    "compiled_memory",
    "make_mesh",
    "param_shardings",
    "shard_batch",
  ),
  "0.3",
)
"""Top-level names that moved to ``c3a_jax.training`` in 0.2 -> the release that drops
``c3a_jax.<name>``."""

RENAMED: dict[str, tuple[str, str]] = {"wrap": ("intercepted", "0.3")}
"""Top-level names renamed in 0.2 -> (the new name, the release that drops the old one)."""

OLD_STRATEGIES: dict[str, str] = {
  "merged": "fold",
  "rfft": "fft",
  "dft": "freq_major",
  "pallas": "auto",  # the Pallas kernel is c3a_jax.experimental.pallas now
}
"""c3a-jax 0.1's strategy names -> the strategy that computes the same product since 0.2.

Only ``"merged"`` was renamed (:data:`RENAMED_STRATEGIES`); the others were removed, and a
0.1 command config's ``c3a.strategy`` (:func:`upgrade_experiment`) is the one place that still
maps them."""

RENAMED_STRATEGIES: dict[str, str] = {"merged": "0.3"}
"""Old strategy names that ``strategy=`` arguments still take, with a DeprecationWarning ->
the release that drops them."""

STRATEGY_FIELD = "0.3"
"""The release that stops reading the ``strategy`` field c3a-jax 0.1 wrote into a C3A config
(``adapter_config.json``, a checkpoint's metadata, a command config's ``c3a`` section)."""


def _shown(value: Any) -> str:
  """A value read from a file, for a warning: a string as itself, anything else by its type
  alone (a YAML alias bomb's repr runs to billions of strings); 60 characters at most."""
  text = repr(value) if isinstance(value, str) else f"<{type(value).__name__}>"
  return text if len(text) <= 60 else text[:57] + "..."


def old_attribute(name: str, package: Any) -> Any:
  """``c3a_jax.<name>`` for a name that moved to ``c3a_jax.training`` or was renamed, read from
  ``package`` (the ``c3a_jax`` module) with a DeprecationWarning naming the caller's line;
  AttributeError for any other."""
  if name in MOVED_TO_TRAINING:
    new, owner, release = f"c3a_jax.training.{name}", package.training, MOVED_TO_TRAINING[name]
    value = getattr(owner, name)
  elif name in RENAMED:
    current, release = RENAMED[name]
    new, value = f"c3a_jax.{current}", getattr(package, current)
  else:
    raise AttributeError(f"module 'c3a_jax' has no attribute {name!r}")
  warnings.warn(
    f"c3a_jax.{name} is deprecated; use {new} (c3a-jax {release} drops c3a_jax.{name})",
    DeprecationWarning,
    stacklevel=3,  # past c3a_jax.__getattr__
  )
  return value


def renamed_strategy(strategy: Any, where: str, *, stacklevel: int = 2) -> Any:
  """The current name of a renamed strategy, with a DeprecationWarning naming ``where``; any
  other value unchanged. ``stacklevel`` counts from the caller, as ``warnings.warn``'s does."""
  if not isinstance(strategy, str) or strategy not in RENAMED_STRATEGIES:
    return strategy
  new = OLD_STRATEGIES[strategy]
  warnings.warn(
    f"{where}: strategy={strategy!r} is deprecated; it is now called {new!r} (c3a-jax "
    f"{RENAMED_STRATEGIES[strategy]} drops {strategy!r})",
    DeprecationWarning,
    stacklevel=stacklevel + 1,
  )
  return new


def upgrade_adapter_config(d: dict, source: str) -> dict:
  """``adapter_config.json``'s fields without the ``strategy`` c3a-jax 0.1 wrote there, with a
  warning naming ``source`` (how the delta is computed is not part of an adapter)."""
  if "strategy" not in d:
    return d
  warnings.warn(
    f"{source}: ignoring strategy={_shown(d['strategy'])}, which c3a-jax 0.1 stored in "
    "the adapter config; pass it to c3a.intercept(strategy=...) instead (in a CLI config: "
    f"train.strategy). c3a-jax {STRATEGY_FIELD} stops reading the field",
    stacklevel=3,  # past C3AConfig.from_dict
  )
  return {k: v for k, v in d.items() if k != "strategy"}


def upgrade_checkpoint_config(d: dict) -> dict:
  """A checkpoint's saved C3A config without the ``strategy`` c3a-jax 0.1 kept there: a compute
  setting, which a resumed run may change, not part of what the checkpoint was made for."""
  return {k: v for k, v in d.items() if k != "strategy"}


def upgrade_experiment(d: Any, source: str) -> Any:
  """A command config read from YAML, with what c3a-jax 0.1 wrote moved to where 0.2 reads it.

  0.1 kept the strategy in the adapter config (``c3a.strategy``); it is a training setting
  now: ``train.strategy`` (unless that is set), old names mapped to what computes the same
  (:data:`OLD_STRATEGIES`). A FutureWarning says so, naming the caller of the config reader.
  ``d`` itself is not changed.
  """
  section = d.get("c3a") if isinstance(d, dict) else None
  if not isinstance(section, dict) or "strategy" not in section:
    return d
  old = section["strategy"]
  new = OLD_STRATEGIES.get(old, old) if isinstance(old, str) else old
  warnings.warn(
    f"{source}: c3a.strategy is deprecated; it is read as train.strategy={_shown(new)}"
    + ("" if new == old else f" (c3a-jax 0.2 has no strategy {_shown(old)})")
    + f"; c3a-jax {STRATEGY_FIELD} stops reading it",
    FutureWarning,
    stacklevel=3,  # past the config reader
  )
  train = d.get("train")
  train = dict(train) if isinstance(train, dict) else {} if train is None else train
  if isinstance(train, dict):
    train.setdefault("strategy", new)
  c3a = {k: v for k, v in section.items() if k != "strategy"}
  return {**d, "c3a": c3a, "train": train}
