"""Files written whole: a reader sees the old file (or directory) or the new one, never half.

What the library writes (adapters, merged checkpoints, configs) goes through here, and so may
code over it (the ``c3a-jax`` command writes its run directories with it):
:func:`atomic_write` for a file, :func:`publish_directory` for a directory of them,
:func:`read_json` for a JSON file whose errors name it, and :func:`brief` for a value read from
one, shown in an error message. Files get the mode ``open()`` would give
them (``0o666`` less the umask), directories ``0o777`` less the umask.

Example:
  >>> import json, os, tempfile
  >>> from c3a_jax import io
  >>> out = os.path.join(tempfile.mkdtemp(), "run")
  >>> with io.publish_directory(out) as into:   # a new directory appears whole, or not at all
  ...   io.atomic_write(os.path.join(into, "summary.json"), b'{"loss": 0.25}')
  ...   os.path.exists(out)
  False
  >>> io.read_json(os.path.join(out, "summary.json"))
  {'loss': 0.25}
"""

from __future__ import annotations

import contextlib
import json
import os
import reprlib
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

__all__ = ["atomic_write", "brief", "publish_directory", "read_json"]

_STATUS = "/proc/self/status"  # Linux's account of the process, its umask included
# Errors show values through this: a value may be huge (a YAML alias bomb's full repr runs to
# billions of strings, and takes hours).
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 60, 60


def atomic_write(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` via a temporary file in the same directory and a rename.

  The temporary is ``.<name>.XXXXXXXX.tmp`` beside ``path`` (removed if the write fails; a
  killed process leaves it, under that name); the file is synced before the rename.

  Example:
    >>> import os, tempfile
    >>> from c3a_jax import io
    >>> path = os.path.join(tempfile.mkdtemp(), "a", "notes.txt")   # parents are made
    >>> io.atomic_write(path, b"old")
    >>> io.atomic_write(path, b"new")
    >>> open(path, "rb").read(), os.listdir(os.path.dirname(path))
    (b'new', ['notes.txt'])
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    os.fchmod(fd, 0o666 & ~_current_umask())  # mkstemp makes 0600; give what open() would
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


@contextlib.contextmanager
def publish_directory(directory: str) -> Iterator[str]:
  """The directory to write ``directory``'s files into, each with :func:`atomic_write`.

  Where ``directory`` exists, that is ``directory`` itself: each file is replaced whole, and
  nothing else in it is touched. Otherwise a new directory ``.<name>.XXXXXXXX`` beside it, which
  is renamed to ``directory`` when the block ends, so that the directory appears with all its
  files or not at all; if the block raises, the new directory is deleted.

  Example:
    >>> import os, tempfile
    >>> from c3a_jax import io
    >>> out = os.path.join(tempfile.mkdtemp(), "adapter")
    >>> with io.publish_directory(out) as into:
    ...   io.atomic_write(os.path.join(into, "weights.bin"), b"...")
    ...   raise RuntimeError("stopped halfway")
    Traceback (most recent call last):
    ...
    RuntimeError: stopped halfway
    >>> os.listdir(os.path.dirname(out))   # nothing half-written is left
    []
  """
  if os.path.exists(directory):
    yield directory
    return
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.")
  try:
    yield tmp
    os.chmod(tmp, 0o777 & ~_current_umask())  # mkdtemp makes 0700; give what mkdir would
    os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _current_umask() -> int:
  """The process's umask, read without changing it.

  ``os.umask`` can only read it by setting it: for that moment every file another thread
  creates (orbax's asynchronous checkpoint save, a data loader) would get the mode its creator
  asked for, unmasked. Linux states it in ``/proc/self/status`` (since 4.7); elsewhere (macOS,
  a Linux without ``/proc``) it is read off a probe directory made in a new temporary
  directory, which the kernel creates with the umask applied. Only where no temporary
  directory can be made either does it fall back to setting and restoring it.
  """
  try:
    with open(_STATUS, "rb") as f:
      for line in f:
        if line.startswith(b"Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  try:
    with tempfile.TemporaryDirectory() as tmp:
      probe = os.path.join(tmp, "probe")
      os.mkdir(probe, 0o777)
      return 0o777 & ~stat.S_IMODE(os.stat(probe).st_mode)
  except OSError:
    umask = os.umask(0o077)  # the moment's files are private rather than open to all
    os.umask(umask)
    return umask


def read_json(path: str) -> Any:
  """The JSON value in file ``path``.

  What ``json`` raises on its own names no file (bytes that are not UTF-8, nesting past the
  recursion limit, an integer past Python's digit limit), so each is one ValueError naming
  ``path``. Missing or unreadable files stay ``OSError``. A leading byte-order mark is read past.

  Example:
    >>> import os, tempfile
    >>> from c3a_jax import io
    >>> path = os.path.join(tempfile.mkdtemp(), "config.json")
    >>> io.atomic_write(path, b'{"block_size": 64,}')
    >>> io.read_json(path)
    Traceback (most recent call last):
    ...
    ValueError: .../config.json is not valid JSON: ...
  """
  with open(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8-sig")  # JSON is UTF-8 (RFC 8259); a leading BOM is tolerated
  except UnicodeDecodeError as e:
    raise ValueError(
      f"{path} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); JSON files "
      "are UTF-8: re-save it as UTF-8"
    ) from None
  try:
    return json.loads(text)
  except RecursionError:
    raise ValueError(
      f"{path} nests deeper than the JSON reader follows (Python's recursion limit, "
      f"{sys.getrecursionlimit()}); no adapter or index nests like that"
    ) from None
  except ValueError as e:  # JSONDecodeError, and int()'s digit limit
    raise ValueError(f"{path} is not valid JSON: {e}") from None


def brief(value: Any, limit: int = 120) -> str:
  """``repr(value)`` bounded to ``limit`` characters, for error messages.

  Nested containers show 2 levels and 4 items each, strings and other values 60 characters: a
  value read from a file may be huge (a YAML alias bomb), and its full ``repr`` with it.

  Example:
    >>> from c3a_jax import io
    >>> io.brief({"block_size": 64, "target_modules": ["q", "k", "v", "o", "up"]})
    "{'block_size': 64, 'target_modules': ['q', 'k', 'v', 'o', ...]}"
    >>> io.brief("x" * 1000, limit=20)
    "'xxxxxxxxxxxxxxxx..."
  """
  text = _REPR.repr(value)
  return text if len(text) <= limit else text[: limit - 3] + "..."
