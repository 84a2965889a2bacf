"""A run directory: what makes a directory a c3a-jax run, who may use it, what may be deleted.

* A run is a directory holding the marker ``.c3a-jax-run.json``, written before anything else.
  It lists the entries a run writes; ``--overwrite`` deletes those and nothing else, and only
  in a directory that carries the marker. A ``config.yaml`` alone does not make a run.
* Before deleting anything, every listed entry is checked: a name that leaves the directory,
  or a symbolic link anywhere in what would be deleted, is an error naming the path, and
  nothing is deleted.
* A process holds an exclusive lock (``fcntl.flock`` on ``.c3a-jax.lock``) for the whole
  run; a second process gets an error naming the holder's pid.

Example:
  >>> import tempfile
  >>> from c3a_jax.cli import rundir
  >>> out = tempfile.mkdtemp()
  >>> rundir.is_run(out)
  False
  >>> with rundir.locked(out):
  ...   rundir.mark(out)
  >>> rundir.is_run(out)
  True
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterator

from c3a_jax import __version__
from c3a_jax._io import atomic_write

MARKER = ".c3a-jax-run.json"
LOCK = ".c3a-jax.lock"
# Everything a run writes, besides the marker and the lock.
ENTRIES = (
  "config.yaml",
  "metrics.jsonl",
  "metrics.png",
  "summary.json",
  "checkpoints",
  "adapter",
  "params.msgpack",
  "baselines",
)


class RunDirError(ValueError):
  """The output directory holds another run, not the run being resumed, or is in use."""


def is_run(out: str) -> bool:
  """Whether ``out`` carries c3a-jax's run marker."""
  return os.path.isfile(os.path.join(out, MARKER))


def mark(out: str) -> None:
  """Makes ``out`` a run: writes the marker, listing what a run may write there."""
  record = {"c3a_jax": __version__, "entries": list(ENTRIES)}
  atomic_write(os.path.join(out, MARKER), json.dumps(record, indent=2).encode())


def user_entries(out: str) -> list[str]:
  """What ``out`` holds besides c3a-jax's own marker and lock."""
  return sorted(set(os.listdir(out)) - {MARKER, LOCK}) if os.path.isdir(out) else []


def _listed(out: str) -> list[str]:
  path = os.path.join(out, MARKER)
  try:
    with open(path) as f:
      entries = json.load(f)["entries"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise RunDirError(f"{path} is not a c3a-jax run marker ({e}); delete the run by hand") from None
  if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
    raise RunDirError(f"{path}: 'entries' must be a list of names, got {entries!r}"[:300])
  return entries


def _links_under(path: str) -> list[str]:
  if os.path.islink(path):
    return [path]
  if not os.path.isdir(path):
    return []
  found = []
  for root, dirs, files in os.walk(path):
    found += [os.path.join(root, n) for n in dirs + files if os.path.islink(os.path.join(root, n))]
  return found


def clear(out: str) -> None:
  """Deletes the entries ``out``'s marker lists (``--overwrite``), after checking them all.

  Raises RunDirError, deleting nothing, if ``out`` is not a run, if a listed name is not a
  plain name inside ``out``, or if a symbolic link lies in anything that would be deleted.
  """
  if not is_run(out):
    raise RunDirError(f"{out} holds no c3a-jax run (no {MARKER}); --overwrite deletes only runs")
  targets = []
  for name in _listed(out):
    if name in ("", ".", "..") or os.path.basename(name) != name:
      raise RunDirError(f"{os.path.join(out, MARKER)} lists {name!r}, not a name inside {out}")
    path = os.path.join(out, name)
    links = _links_under(path)
    if links:
      raise RunDirError(
        f"--overwrite: {links[0]} is a symbolic link; c3a-jax does not delete through links. "
        "Nothing was deleted; remove it by hand"
      )
    if os.path.lexists(path):
      targets.append(path)
  for path in targets:
    if os.path.isdir(path):
      shutil.rmtree(path)
    else:
      os.remove(path)


def clean_temporaries(out: str) -> list[str]:
  """Removes what a killed run left half-written in ``out``: the temporaries c3a-jax writes
  beside an entry before renaming it into place (``.adapter.XXXX/``, ``.summary.json.XXXX.tmp``).
  Returns their names. Links are left alone."""
  prefixes = tuple(f".{name}." for name in ENTRIES)
  removed = []
  for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
    path = os.path.join(out, name)
    if not name.startswith(prefixes) or os.path.islink(path):
      continue
    if os.path.isdir(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
    removed.append(name)
  return removed


@contextlib.contextmanager
def locked(out: str) -> Iterator[None]:
  """Holds ``out``'s exclusive lock (creating ``out`` if needed) until the block ends.

  Another process holding it is a RunDirError naming that process's pid.
  """
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, LOCK)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
      raise RunDirError(
        f"{out} is in use by another c3a-jax process (pid {holder}); wait for it to finish "
        "or choose another output_dir"
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # closing releases the lock
