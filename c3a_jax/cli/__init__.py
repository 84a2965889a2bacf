"""The ``c3a-jax`` command: fine-tune with C3A from YAML configs.

An app beside the library, with dependencies of its own (``pip install "c3a-jax[cli]"``):
``commands`` (the subcommands), ``experiment`` (configs), ``runner`` (the training loop),
``rundir`` (what a run directory guarantees: its marker, its lock, what may be deleted),
``job`` (a model and its data), ``hub`` (Hugging Face models and datasets), ``digits`` (the
offline default task) and ``blocks`` (block size suggestions).
"""

from __future__ import annotations

import contextlib
import importlib.util
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

# What the [cli] extra installs and the library never imports: the app's own modules, checked
# before anything runs, and the Hugging Face ones, needed only for hub models and datasets.
_APP_MODULES = ("yaml", "pydantic", "tqdm", "matplotlib", "sklearn")
_HUB_MODULES = ("transformers", "datasets", "huggingface_hub", "PIL")


def _missing(module: str, needed_for: str = "the command line") -> str:
  return (
    f"c3a-jax: error: {needed_for} needs {module!r}, which is not installed; install the app's "
    'dependencies with: pip install "c3a-jax[cli]" (it includes the [hf] extra)'
  )


@contextlib.contextmanager
def _ctrl_c_recorded() -> Iterator[list[int]]:
  """Python's Ctrl-C handler (raise KeyboardInterrupt), also recording the signal in the list
  this yields: a KeyboardInterrupt raised inside a gc callback (JAX's ``_xla_gc_callback``) is
  dropped, and the record still ends the command with status 130. A process started with
  SIGINT ignored, or another handler set, keeps it."""
  received: list[int] = []

  def handler(signum, frame):
    received.append(signum)
    raise KeyboardInterrupt

  mine = threading.current_thread() is threading.main_thread()
  if not mine or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
    yield received
    return
  signal.signal(signal.SIGINT, handler)
  try:
    yield received
  finally:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs ``c3a-jax`` with ``argv`` (default: the process's); returns the exit status."""
  for module in _APP_MODULES:
    if importlib.util.find_spec(module) is None:
      print(_missing(module), file=sys.stderr)
      return 2
  try:
    from c3a_jax.cli import commands

    with _ctrl_c_recorded() as received:
      status = commands.main(argv)
    if received:  # its KeyboardInterrupt was dropped where it was raised
      raise KeyboardInterrupt
    return status
  except KeyboardInterrupt:  # Ctrl-C while loading models or data, or compiling: nothing to save
    print("c3a-jax: interrupted (a run keeps its complete checkpoints)", file=sys.stderr)
    return 130
  except ModuleNotFoundError as e:
    if (e.name or "").split(".")[0] not in _HUB_MODULES:
      raise
    needed_for = "a Hugging Face model or dataset (every task but digits)"
    print(_missing(e.name, needed_for), file=sys.stderr)
    return 2


__all__ = ["main"]
