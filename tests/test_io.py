"""c3a_jax.io: files and directories appear whole, with the modes open() and mkdir() give, and
reading the umask never changes it.

Setting the umask for a moment, as ``os.umask`` reads it, gives the files any thread creates at
that moment the umask 0: tensorstore's threads under orbax's asynchronous save run without the
GIL, so the window is real there, though Python threads (which hold the GIL through both
calls) cannot hit it in a test. So the tests check that ``os.umask`` is never called.
"""

import os
import stat

import pytest

from c3a_jax import io


@pytest.fixture
def umask():
  """The process's umask set to 0o027 for the test (a value no default has), then restored."""
  old = os.umask(0o027)
  yield 0o027
  os.umask(old)


def _mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_untouchable(monkeypatch):
  def refuse(mask):
    raise AssertionError(f"os.umask({mask:#o}) called: another thread's files would see it")

  monkeypatch.setattr(os, "umask", refuse)


def test_the_umask_is_read_without_changing_it(umask, umask_untouchable):
  assert io._current_umask() == umask


def test_without_proc_the_umask_is_read_off_a_probe_directory(
  umask, umask_untouchable, monkeypatch
):
  monkeypatch.setattr(io, "_STATUS", "/nonexistent/status")  # macOS, or no /proc mounted
  assert io._current_umask() == umask


def test_the_last_fallback_sets_and_restores_it(umask, monkeypatch):
  monkeypatch.setattr(io, "_STATUS", "/nonexistent/status")
  monkeypatch.setattr(io.tempfile, "TemporaryDirectory", lambda: open("/nonexistent/dir"))
  assert io._current_umask() == umask
  assert os.umask(umask) == umask


def test_atomic_write_gives_opens_mode_and_leaves_no_temporary(tmp_path, umask):
  path = tmp_path / "sub" / "a.json"
  io.atomic_write(str(path), b"1")
  io.atomic_write(str(path), b"2")
  assert path.read_bytes() == b"2" and _mode(path) == 0o666 & ~umask
  assert os.listdir(path.parent) == ["a.json"]
  with pytest.raises(TypeError):
    io.atomic_write(str(path), "not bytes")
  assert path.read_bytes() == b"2" and os.listdir(path.parent) == ["a.json"]


def test_a_new_directory_appears_whole_with_mkdirs_mode(tmp_path, umask):
  out = tmp_path / "adapter"
  with io.publish_directory(str(out)) as into:
    io.atomic_write(os.path.join(into, "a"), b"1")
    assert not out.exists() and os.path.basename(into).startswith(".adapter.")
  assert os.listdir(out) == ["a"] and _mode(out) == 0o777 & ~umask
  assert os.listdir(tmp_path) == ["adapter"]


def test_a_failed_new_directory_leaves_nothing(tmp_path):
  with pytest.raises(RuntimeError, match="halfway"):
    with io.publish_directory(str(tmp_path / "new" / "adapter")) as into:
      io.atomic_write(os.path.join(into, "a"), b"1")
      raise RuntimeError("halfway")
  assert os.listdir(tmp_path / "new") == []


def test_an_existing_directory_is_written_in_place(tmp_path):
  (tmp_path / "keep").write_bytes(b"mine")
  with pytest.raises(RuntimeError):
    with io.publish_directory(str(tmp_path)) as into:
      assert into == str(tmp_path)
      io.atomic_write(os.path.join(into, "a"), b"1")
      raise RuntimeError("halfway")
  assert sorted(os.listdir(tmp_path)) == ["a", "keep"]  # what was written stays, nothing else


def test_read_json_names_the_file(tmp_path):
  path = tmp_path / "config.json"
  path.write_bytes(b'\xef\xbb\xbf{"a": 1}')
  assert io.read_json(str(path)) == {"a": 1}  # a byte-order mark is read past
  path.write_bytes(b'{"a": "\xff"}')
  with pytest.raises(ValueError, match=r"config.json is not UTF-8 text \(byte 0xff at offset 7"):
    io.read_json(str(path))
  path.write_bytes(b"[" * 100_000)
  with pytest.raises(ValueError, match="config.json nests deeper than the JSON reader follows"):
    io.read_json(str(path))
  path.write_bytes(b"{")
  with pytest.raises(ValueError, match="config.json is not valid JSON"):
    io.read_json(str(path))
  with pytest.raises(FileNotFoundError):
    io.read_json(str(tmp_path / "missing.json"))
