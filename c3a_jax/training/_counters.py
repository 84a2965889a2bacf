"""Counters for training runs: step time, tokens per second, and XLA's compiled memory."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np


def compiled_memory(jitted: Any, *args: Any) -> dict[str, int]:
  """XLA's memory estimate, in bytes, for ``jitted(*args)`` (a ``jax.jit``-ed function).

  Keys: ``argument``, ``output``, ``temp``, ``generated_code``, and ``peak`` (argument + output
  + temp, less output aliased onto donated arguments).
  """
  analysis = jitted.lower(*args).compile().memory_analysis()
  if analysis is None:
    raise RuntimeError("this backend gives no compiled memory analysis")
  out = {
    k: int(getattr(analysis, f"{k}_size_in_bytes"))
    for k in ("argument", "output", "temp", "generated_code", "alias")
  }
  out["peak"] = out["argument"] + out["output"] + out["temp"] - out.pop("alias")
  return out


class Throughput:
  """Step time and tokens per second over the last ``window`` steps (host wall clock).

  >>> import jax.numpy as jnp
  >>> from c3a_jax.training import Throughput
  >>> meter = Throughput()
  >>> with meter.measure(tokens=1024):
  ...   _ = jnp.ones(4).block_until_ready()
  >>> meter.steps, meter.tokens_per_s > 0
  (1, True)
  """

  def __init__(self, window: int = 20):
    self.window = window
    self._times: list[float] = []
    self._tokens: list[int] = []

  @contextlib.contextmanager
  def measure(self, tokens: int) -> Iterator[None]:
    """Times one step; block on the step's outputs inside it."""
    start = time.perf_counter()
    yield
    self.record(time.perf_counter() - start, tokens)

  def record(self, seconds: float, tokens: int) -> None:
    self._times = (self._times + [seconds])[-self.window :]
    self._tokens = (self._tokens + [tokens])[-self.window :]

  @property
  def steps(self) -> int:
    return len(self._times)

  @property
  def step_time(self) -> float:
    """Median seconds per step over the window."""
    return float(np.median(self._times)) if self._times else float("nan")

  @property
  def tokens_per_s(self) -> float:
    return sum(self._tokens) / sum(self._times) if self._times else float("nan")
