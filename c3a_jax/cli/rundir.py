"""A run directory: what makes a directory a c3a-jax run, who may use it, what may be deleted.

* A run is a directory holding the marker ``.c3a-jax-run.json``, written before anything else.
  It lists the entries a run writes; ``--overwrite`` deletes those and nothing else, and only
  in a directory that carries the marker. A ``config.yaml`` alone does not make a run.
* Before deleting anything, every listed entry is checked: a name that leaves the directory,
  or a symbolic link anywhere in what would be deleted, is an error naming the path, and
  nothing is deleted.
* A process holds an exclusive lock (``fcntl.flock`` on ``.c3a-jax.lock``) for the whole
  run; a second process gets an error naming the holder's pid. The lock file is never opened
  through a link, and one that is not c3a-jax's (not a plain file holding a pid) is refused
  untouched. ``--overwrite`` also takes the locks of the runs inside what it deletes (the
  baselines').
* A kill at any point leaves a directory that ``--resume`` or ``--overwrite`` takes back:
  what c3a-jax had half written (the marker's temporary too) is recognised and removed.

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
import stat
from collections.abc import Iterator

from c3a_jax import __version__
from c3a_jax.io import atomic_write

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
  "comparison.png",
)
# What a kill inside mark() leaves: atomic_write's temporary of the marker (".<name>.XXXX.tmp").
_MARKER_TEMPORARY = f".{MARKER}."


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
  """What ``out`` holds besides c3a-jax's own marker, lock and half-written marker."""
  names = os.listdir(out) if os.path.isdir(out) else []
  return sorted(n for n in names if n not in (MARKER, LOCK) and not n.startswith(_MARKER_TEMPORARY))


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
  plain name inside ``out``, if a symbolic link lies in anything that would be deleted, if a
  run inside it (a baseline) is in use, or if a directory to delete from is not writable.
  ``out``'s own lock is the caller's to hold.
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
  with contextlib.ExitStack() as held:
    for run in _runs_under(targets):  # held while deleting: no baseline starts meanwhile
      try:
        held.enter_context(locked(run))
      except RunDirError as e:
        raise RunDirError(f"--overwrite: {e}; nothing was deleted") from None
    _check_writable([out, *targets])
    for path in targets:
      if os.path.isdir(path):
        shutil.rmtree(path)
      else:
        os.remove(path)


def _runs_under(paths: list[str]) -> list[str]:
  """The directories in ``paths`` (and below) that hold a run's lock file: the baselines'."""
  return [
    root
    for path in paths
    if os.path.isdir(path)
    for root, _, files in os.walk(path)
    if LOCK in files
  ]


def _check_writable(paths: list[str]) -> None:
  """Refuses, before the first deletion, what would stop one halfway: a directory whose
  entries cannot be removed (deleting a file or folder writes to the directory holding it)."""
  for path in paths:
    for root, _, _ in os.walk(path) if os.path.isdir(path) else ():
      if not os.access(root, os.W_OK | os.X_OK):
        raise RunDirError(
          f"--overwrite: {root} is not writable, so what it holds cannot be deleted; nothing "
          "was deleted"
        )


def clean_temporaries(out: str) -> list[str]:
  """Removes what a killed run left half-written in ``out``: the temporaries c3a-jax writes
  beside an entry before renaming it into place (``.adapter.XXXX/``, ``.summary.json.XXXX.tmp``).
  Returns their names. Links are left alone."""
  prefixes = (*(f".{name}." for name in ENTRIES), _MARKER_TEMPORARY)
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

  Another process holding it is a RunDirError naming that process's pid; so is a lock file
  that is a link or not c3a-jax's (:func:`_open_lock`), which is left as it is.
  """
  os.makedirs(out, exist_ok=True)
  fd = _open_lock(out, os.O_RDWR | os.O_CREAT)
  try:
    _acquire(fd, out, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)  # ours: _open_lock checked it holds a pid at most
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # closing releases the lock


def check_free(out: str) -> None:
  """Refuses, as :func:`locked` would, a directory another process holds, or whose lock file is
  a link or not c3a-jax's; takes and writes nothing (run before the model loads, for minutes).

  It takes a shared lock for an instant: a run starting in that instant is refused as if this
  process held the directory, which is safe."""
  path = os.path.join(out, LOCK)
  if not (os.path.isdir(out) and os.path.lexists(path)):
    return
  fd = _open_lock(out, os.O_RDONLY)
  try:
    _acquire(fd, out, fcntl.LOCK_SH)
  finally:
    os.close(fd)


def _open_lock(out: str, flags: int) -> int:
  """A descriptor of ``out``'s lock file, never through a link: opened for writing, a link
  would have its target truncated (or created). A link, anything but a plain file, a file with
  other names (hard links) or one holding anything but a pid is not c3a-jax's: a RunDirError,
  and it is left as it is."""
  path = os.path.join(out, LOCK)
  if os.path.islink(path):
    raise _linked(path)
  if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
    raise _not_ours(path)  # not opened: opening a FIFO or a device can block or act
  try:
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
  except OSError as e:
    if e.errno == errno.ELOOP:  # a link made since the check above
      raise _linked(path) from None
    raise
  info, text = os.fstat(fd), os.pread(fd, 33, 0).strip()
  plain = stat.S_ISREG(info.st_mode) and info.st_nlink == 1  # no other name truncates with it
  if not plain or len(text) > 32 or (text and not text.isdigit()):
    os.close(fd)
    raise _not_ours(path)
  return fd


def _linked(path: str) -> RunDirError:
  return RunDirError(
    f"{path} is a symbolic link; c3a-jax does not follow links to its lock file, so nothing was "
    "written through it: remove the link"
  )


def _not_ours(path: str) -> RunDirError:
  return RunDirError(
    f"{path} is not c3a-jax's lock file (a plain file holding a pid), so nothing was written to "
    "it: move it aside, or choose another output_dir"
  )


def _acquire(fd: int, out: str, how: int) -> None:
  """``flock(fd, how)`` without waiting; held elsewhere, a RunDirError naming the holder."""
  try:
    fcntl.flock(fd, how | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno not in (errno.EAGAIN, errno.EACCES):
      raise
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    raise RunDirError(
      f"{out} is in use by another c3a-jax process (pid {holder}); wait for it to finish "
      "or choose another output_dir"
    ) from None
