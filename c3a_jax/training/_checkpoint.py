"""Training checkpoints with orbax: the TrainState (adapter, optimizer state, step, RNG) and the
data position; saved asynchronously, the last N kept, restored onto any mesh, resumed exactly.

The frozen base is never written: it is the pretrained model, loaded again on resume. Orbax
writes each step into a temporary directory and renames it when complete, so a process killed
mid-save leaves the earlier checkpoints intact, and restore finds the newest complete one.
Each save records checksums of its arrays and a digest of its metadata (the step, the data
position, the checksums); a checkpoint whose bytes changed on disk, or whose directory is named
for another step, is refused, and restore falls back to the newest one that is whole.

Example:
  >>> import tempfile, jax.numpy as jnp, optax, c3a_jax as c3a
  >>> tx = optax.adam(1e-2)
  >>> state = c3a.training.TrainState.create({"fc": {"c3a_kernel": jnp.ones((2, 2, 4))}}, tx)
  >>> with c3a.training.Checkpointer(tempfile.mkdtemp(), max_to_keep=2) as ckpt:
  ...   _ = ckpt.save(state, data_position=128)
  ...   ckpt.wait()
  ...   restored, position = ckpt.restore(state)
  >>> position
  128
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any

import jax
import numpy as np

import c3a_jax as c3a  # the library's public names, read at call time: c3a_jax imports training
from c3a_jax import _compat
from c3a_jax.training._step import TrainState


def _shapes(tree: Any) -> dict[str, list]:
  return {
    jax.tree_util.keystr(p): [list(np.shape(x)), str(jax.numpy.result_type(x))]
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs carrying each leaf's sharding (the placement to restore onto)."""

  def one(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return jax.ShapeDtypeStruct(
      np.shape(x), jax.numpy.result_type(x), sharding=getattr(x, "sharding", None)
    )

  return jax.tree.map(one, tree)


@jax.jit
def _checksums(tree: Any) -> Any:
  """Two order-free sums of each leaf's bits (uint32, wrapping), computed where the leaf lives:
  equal for equal bytes on any mesh; a flipped bit changes them."""

  def one(x):
    x = jax.numpy.asarray(x)
    if x.dtype == jax.numpy.bool_:
      x = x.astype(jax.numpy.uint8)
    width = {1: jax.numpy.uint8, 2: jax.numpy.uint16, 4: jax.numpy.uint32, 8: jax.numpy.uint32}
    bits = jax.lax.bitcast_convert_type(x, width[x.dtype.itemsize]).astype(jax.numpy.uint32)
    bits = bits.reshape(-1)
    weights = (jax.numpy.arange(bits.size, dtype=jax.numpy.uint32) % 65521) + 1
    return jax.numpy.stack(
      [bits.sum(dtype=jax.numpy.uint32), (bits * weights).sum(dtype=jax.numpy.uint32)]
    )

  return jax.tree.map(one, tree)


def _sums(tree: Any) -> dict[str, list[int]]:
  sums = jax.device_get(_checksums(tree))
  return {
    jax.tree_util.keystr(p): [int(v) for v in x]
    for p, x in jax.tree_util.tree_flatten_with_path(sums)[0]
  }


class CorruptCheckpointError(ValueError):
  """A checkpoint's files do not hold what was saved (flipped bytes, a truncated file), or its
  directory is named for another step (a copy)."""


# The metadata's keys as each version saves them: any other set is damage (a flipped bit in a
# key's name), never a format to read without its digest.
_META_KEYS = (
  frozenset({"step", "data_position", "state", "config"}),  # c3a-jax 0.2.0 and before
  frozenset({"step", "data_position", "state", "config", "checksums"}),  # before the digest
  frozenset({"step", "data_position", "state", "config", "checksums", "digest"}),
)


def _digest(meta: dict) -> str:
  """SHA-256 of the metadata but its digest: restore reads the data position and the checksums
  from it, so a flipped bit there would resume elsewhere in the data, or pass damaged arrays."""
  rest = {k: v for k, v in meta.items() if k != "digest"}
  return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _orbax() -> Any:
  # Imported when a Checkpointer is made, so that `import c3a_jax` does not pay for orbax.
  import orbax.checkpoint

  return orbax.checkpoint


def _first(e: Exception) -> str:
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _differences(saved: dict, current: dict, what: str) -> list[str]:
  out = []
  for key in sorted(set(saved) | set(current)):
    if key not in current:
      out.append(f"{what} {key}: in the checkpoint ({saved[key]}), not here")
    elif key not in saved:
      out.append(f"{what} {key}: here ({current[key]}), not in the checkpoint")
    elif saved[key] != current[key]:
      out.append(f"{what} {key}: checkpoint has {saved[key]!r}, here {current[key]!r}")
  return out


class Checkpointer:
  """Saves and restores :class:`~c3a_jax.TrainState` with orbax's CheckpointManager.

  Args:
    directory: where step directories go (created if missing).
    max_to_keep: keep the last N complete checkpoints.
    async_save: return from :meth:`save` while the write finishes in the background.
    config: the C3AConfig of the run; restore refuses a checkpoint made with a different one.
  """

  def __init__(
    self,
    directory: str,
    *,
    max_to_keep: int = 3,
    async_save: bool = True,
    config: c3a.C3AConfig | None = None,
  ):
    if not isinstance(max_to_keep, int) or max_to_keep < 1:
      raise ValueError(f"max_to_keep must be a positive integer, got {max_to_keep!r}")
    self.directory = os.path.abspath(directory)
    self.config = config
    self._pending: int | None = None  # the step of an asynchronous save not yet waited for
    if os.path.lexists(self.directory) and not os.path.isdir(self.directory):
      # Orbax would log a traceback from a background thread before raising.
      kind = "a file" if os.path.isfile(self.directory) else "a broken link"
      raise NotADirectoryError(
        f"checkpoint directory {self.directory} is {kind}, not a directory; move it away or "
        "choose another directory"
      )
    ocp = _orbax()
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=True,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "meta")
    )

  def save(self, state: TrainState, *, data_position: Any = None, force: bool = False) -> bool:
    """Starts saving ``state`` at its step; ``data_position`` is any JSON value (e.g. the
    index of the next batch). Returns whether a save was started.

    Raises:
      OSError: naming the checkpoint, when it (or the asynchronous save before it) could not be
        written, e.g. on a full disk.
    """
    step = int(state.step)
    meta = {
      "step": step,
      "data_position": data_position,
      "state": _shapes(state),
      "checksums": _sums(state),
      "config": None if self.config is None else self.config.to_dict(),
    }
    meta["digest"] = _digest(meta)
    self.wait()  # as orbax would; here a failure of the save before names that one
    ocp = _orbax()
    try:
      started = self._manager.save(
        step,
        force=force,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      )
    except Exception as e:
      raise self._not_written(step, e) from e
    self._pending = step if started else None
    return started

  def _not_written(self, step: int | None, error: Exception) -> OSError:
    where = self.directory if step is None else f"{self.directory}/{step}"
    return OSError(f"checkpoint {where} was not written: {_first(error)}")

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The steps of every complete checkpoint kept."""
    return list(self._manager.all_steps())

  def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, Any]:
    """Restores ``(state, data_position)`` from ``step`` (default: the newest complete one).

    ``target`` gives structure, shapes, dtypes and placement: a TrainState built for this run
    (e.g. ``TrainState.create`` placed with ``jax.device_put(state, shardings)``), or one of
    ``jax.ShapeDtypeStruct``s with shardings. A different mesh or device count than at save
    time is fine. Every restored array is checked against the checksums saved with it, and the
    metadata (data position, step, checksums) against its digest. Without ``step``, a newest
    checkpoint that is corrupt (checksums or digest differ, its files do not read, or its
    directory holds another step) is skipped with a warning naming it, for the newest one that
    restores whole, and moved aside to ``<step>.corrupt``.

    Raises:
      ValueError: naming what differs, when the checkpoint was made for another config or model.
      CorruptCheckpointError: every candidate checkpoint is corrupt, each one named (``step``
        given: that one).
      OSError: an asynchronous save before could not be written.
      FileNotFoundError: there is no complete checkpoint.
    """
    self.wait()
    steps = self.all_steps()
    if (step is not None and step not in steps) or not steps:
      raise FileNotFoundError(
        f"no complete checkpoint {'' if step is None else step} in "
        f"{self.directory} (complete steps: {steps})"
      )
    candidates = [step] if step is not None else sorted(steps, reverse=True)
    errors, bad = [], []
    for s in candidates:
      try:
        restored = self._restore(target, s)
      except CorruptCheckpointError as e:
        errors.append(e)
        bad.append(s)
        if s != candidates[-1]:
          warnings.warn(f"{e}; restoring an earlier checkpoint", stacklevel=2)
        continue
      if bad:
        self._set_aside(bad)
      return restored
    if len(errors) == 1:
      raise errors[0]
    raise CorruptCheckpointError(  # every one named: the user decides what to keep
      f"no checkpoint in {self.directory} is whole: " + "; ".join(map(str, errors))
    ) from errors[0]

  def _set_aside(self, steps: list[int]) -> None:
    """Renames corrupt steps to ``<step>.corrupt`` (kept for inspection, never deleted), so that
    the resumed run can save those steps again."""
    for s in steps:
      path = os.path.join(self.directory, str(s))
      aside, n = f"{path}.corrupt", 1
      while os.path.lexists(aside):  # set aside before, and saved again since
        aside, n = f"{path}.corrupt.{n}", n + 1
      os.rename(path, aside)
      warnings.warn(f"checkpoint {path} moved aside to {aside}", stacklevel=3)
    self._manager.reload()

  def _metadata(self, step: int) -> dict:
    """The metadata of ``step``, checked against its digest and its directory's name."""
    ocp = _orbax()
    where = f"checkpoint {self.directory}/{step}"
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      meta = meta["meta"]
    except Exception as e:
      raise CorruptCheckpointError(
        f"{where} is corrupt: its metadata does not read ({_first(e)})"
      ) from e
    if not isinstance(meta, dict) or frozenset(meta) not in _META_KEYS:
      keys = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
      raise CorruptCheckpointError(
        f"{where} is corrupt: its metadata has keys {keys}, not those c3a-jax saves"
      )
    if "digest" in meta and meta["digest"] != _digest(meta):
      raise CorruptCheckpointError(
        f"{where} is corrupt: its metadata differs from what was saved (digest)"
      )
    if meta["step"] != step:  # e.g. `cp -r 100 250`: resumed at 100, it would save 200 again
      raise CorruptCheckpointError(
        f"{where} holds step {meta['step']!r}, not {step}: a step directory copied or renamed"
      )
    return meta

  def _restore(self, target: TrainState, step: int) -> tuple[TrainState, Any]:
    ocp = _orbax()
    where = f"checkpoint {self.directory}/{step}"
    meta = self._metadata(step)
    problems = _differences(meta["state"], _shapes(target), "state leaf")
    if self.config is not None and meta["config"] is not None:
      saved = _compat.upgrade_checkpoint_config(meta["config"])
      problems += _differences(saved, self.config.to_dict(), "config field")
    if problems:
      raise ValueError(
        f"{where} was made for another config or model:\n  " + "\n  ".join(problems[:20])
      )
    try:
      restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(target)))
      )["state"]
    except Exception as e:
      raise CorruptCheckpointError(
        f"{where} is corrupt: its arrays do not read ({_first(e)})"
      ) from e
    saved = meta.get("checksums")  # None in checkpoints of c3a-jax 0.2.0 and before
    if saved is not None:
      bad = [k for k, v in _sums(restored).items() if saved.get(k) != v]
      if bad:
        raise CorruptCheckpointError(
          f"{where} is corrupt: {len(bad)} arrays differ from what was saved (checksums), "
          f"e.g. {bad[:3]}"
        )
    return restored, meta["data_position"]

  def wait(self) -> None:
    """Blocks until an asynchronous save has finished; an OSError names a checkpoint that could
    not be written."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._not_written(self._pending, e) from e
    self._pending = None

  def close(self) -> None:
    """Finishes pending saves and releases orbax's resources (an OSError as :meth:`wait`)."""
    try:
      self._manager.close()
    except Exception as e:
      raise self._not_written(self._pending, e) from e

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
