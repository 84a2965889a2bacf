"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any


def atomic_write(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` via a temporary file in the same directory and a rename."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; give what open() would
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def current_umask() -> int:
  umask = os.umask(0)
  os.umask(umask)
  return umask


def read_json(path: str) -> Any:
  """The JSON value in file ``path``. What ``json`` raises on its own names no file (bytes that
  are not UTF-8, nesting past the recursion limit, an integer past Python's digit limit), so
  each is one ValueError naming ``path``. Missing or unreadable files stay ``OSError``."""
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
