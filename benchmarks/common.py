"""Shared helpers for the benchmarks: machine description, interleaved timing, LoRA baseline.

The LoRA and bias-only baselines live here, not in the library: they exist to be compared with.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from c3a_jax import ops


def machine_info() -> dict[str, Any]:
  """The machine as a dict: CPU model and cores, the JAX backend and its first device's kind
  (the GPU's name off CPU) and count, the jax, jaxlib and flax versions, Python, load, date."""
  import flax

  model = platform.processor() or "unknown CPU"
  try:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
      if line.startswith("Model name:"):
        model = line.split(":", 1)[1].strip()
  except OSError:
    pass
  devices = jax.devices()
  try:
    import jaxlib

    jaxlib_version = jaxlib.__version__
  except (ImportError, AttributeError):
    jaxlib_version = "unknown"
  return {
    "cpu": model,
    "cores": os.cpu_count(),
    "backend": jax.default_backend(),
    "device_kind": devices[0].device_kind,
    "device_count": len(devices),
    "jax": jax.__version__,
    "jaxlib": jaxlib_version,
    "flax": flax.__version__,
    "python": platform.python_version(),
    "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
    "date": datetime.datetime.now().isoformat(timespec="minutes"),
  }


def machine() -> str:
  """One line naming the CPU, core count, the accelerator (off CPU), load, JAX version, date."""
  m = machine_info()
  device = "" if m["backend"] == "cpu" else f"{m['device_count']} x {m['device_kind']}, "
  return (
    f"{m['cpu']}, {m['cores']} cores, {device}backend {m['backend']}, jax {m['jax']}, "
    f"flax {m['flax']}, 1-min load at start {m['load']:.2f}, {m['date']}"
  )


def wait_for_quiet(
  max_load: float = 1.5,
  tries: int = int(os.environ.get("BENCH_WAIT_TRIES", 6)),
  sleep_s: float = 20.0,
) -> float:
  """Waits (a few times; env BENCH_WAIT_TRIES) for the 1-minute load to drop below ``max_load``."""
  load = os.getloadavg()[0]
  for _ in range(tries):
    if load < max_load:
      break
    print(f"# load {load:.2f} >= {max_load}; waiting {sleep_s:.0f}s", flush=True)
    time.sleep(sleep_s)
    load = os.getloadavg()[0]
  return load


def interleaved(
  fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, float]:
  """Median seconds of each ``fn()``, run round-robin so that load drifts hit all alike."""
  return {k: statistics.median(v) for k, v in rounds(fns, repeats, warmup).items()}


def rounds(
  fns: dict[str, Callable[[], Any]],
  repeats: int,
  warmup: int = 1,
  calls: int = 1,
  sync: Callable[[Any], Any] = jax.block_until_ready,
) -> dict[str, list[float]]:
  """Seconds of each ``fn()`` in each of ``repeats`` round-robin rounds (jax outputs waited
  for; a ``None`` output, e.g. a PyTorch step, needs no wait).

  Each sample is ``calls`` back-to-back calls, waited for once at the end (``sync`` of the
  last output: on an accelerator the calls queue up on one stream, so the last done means all
  done), divided by ``calls``: on a GPU one call is too short for a host clock. ``sync``
  waits for the device (e.g. ``lambda _: torch.cuda.synchronize()`` for PyTorch on CUDA).
  """
  for fn in fns.values():
    for _ in range(warmup):
      sync(fn())
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      for _ in range(calls):
        out = fn()
      sync(out)
      times[name].append((time.perf_counter() - t) / calls)
  return times


def ratios(times: dict[str, list[float]], base: str) -> dict[str, float]:
  """Median over rounds of each function's time / ``base``'s time in the same round.

  On a shared machine the load of other tenants drifts between rounds; a ratio of times
  taken seconds apart sees the same load, so its median is steadier than a ratio of medians.
  """
  return {
    k: statistics.median(a / b for a, b in zip(v, times[base], strict=True))
    for k, v in times.items()
  }


def fwd_bwd(f: Callable[..., jax.Array], argnums: tuple[int, ...] | None = None):
  """jit of: y = f(*args) and the VJP of a cotangent ``g`` (the last argument), with respect to
  the arguments at ``argnums`` (default: all of them); the others are held constant.

  ``y`` is cast to ``g``'s dtype: the VJP needs a cotangent of the output's dtype, and a
  function that returns float32 for a bfloat16 layer (``ops.fold`` does) pays the cast back to
  the layer's dtype, as the layer would.
  """

  def step(*args):
    *args, g = args
    wrt = tuple(range(len(args))) if argnums is None else argnums

    def h(*diff):
      full = list(args)
      for i, v in zip(wrt, diff, strict=True):
        full[i] = v
      return f(*full).astype(g.dtype)

    y, vjp = jax.vjp(h, *(args[i] for i in wrt))
    return y, vjp(g)

  return jax.jit(step)


def adapted_dense(dtype: Any, x_shape: tuple[int, ...], w_shape: tuple[int, int, int]):
  """(f(x, kernel, w), folds): one adapted Dense computed as c3a.intercept() runs it under
  "auto" (``x @ (kernel + delta)`` where it folds, else ``x @ kernel`` plus the delta), the
  frozen kernel held out of the gradient."""
  if ops.can_fold(dtype) and ops.choose_strategy(x_shape, w_shape, with_base=True) == "fold":
    return (lambda x, k, w: ops.fold(x, w, jax.lax.stop_gradient(k)).astype(x.dtype)), True
  return (lambda x, k, w: x @ jax.lax.stop_gradient(k) + ops.block_circulant_matmul(x, w)), False


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
  fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def print_row(row: list[Any]) -> None:
  """One table row as it is measured, floats to 3 places: long runs show progress."""
  print(" ".join(str(round(v, 3) if isinstance(v, float) else v) for v in row), flush=True)


def _adding_interceptor(leaf: str, delta: Callable[..., jax.Array]):
  """An interceptor adding ``delta(x, module, y.dtype)`` to each nn.Dense holding ``leaf``."""

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (
      context.method_name != "__call__"
      or not isinstance(module, nn.Dense)
      or module.scope is None
      or not module.has_variable("params", leaf)
    ):
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    return y + delta(x, module, y.dtype).astype(y.dtype)

  return interceptor


def lora_interceptor(scale: float):
  """The LoRA baseline: ``(x @ lora_a) @ lora_b * scale`` added to Dense layers."""

  def delta(x, module, dtype):
    a, b = module.get_variable("params", "lora_a"), module.get_variable("params", "lora_b")
    return ((x.astype(dtype) @ a) @ b) * scale

  return _adding_interceptor("lora_a", delta)


def pallas_interceptor():
  """The experimental Pallas kernel in a model: ``pallas.apply(x, w)`` added to Dense layers
  holding a C3A kernel. It is not a strategy of c3a.intercept (it is unmeasured on the GPUs
  and TPUs it is written for)."""
  from c3a_jax.experimental import pallas

  def delta(x, module, dtype):
    w = module.get_variable("params", "c3a_kernel")
    y = pallas.apply(x.reshape(-1, x.shape[-1]).astype(jnp.float32), w)
    return y.reshape(*x.shape[:-1], -1)

  return _adding_interceptor("c3a_kernel", delta)


def attach_lora(params: Any, targets: tuple[str, ...], rank: int, key: jax.Array) -> Any:
  """Adds lora_a (in, r) ~ kaiming-uniform and lora_b (r, out) = 0 beside each targeted kernel."""
  flat = traverse_util.flatten_dict(params)
  out = dict(flat)
  for path, leaf in flat.items():
    if path[-1] == "kernel" and path[-2] in targets and leaf.ndim == 2:
      key, sub = jax.random.split(key)
      d_in, d_out = leaf.shape
      bound = 1.0 / d_in**0.5
      out[(*path[:-1], "lora_a")] = jax.random.uniform(
        sub, (d_in, rank), jnp.float32, -bound, bound
      )
      out[(*path[:-1], "lora_b")] = jnp.zeros((rank, d_out), jnp.float32)
  return traverse_util.unflatten_dict(out)


def partition(params: Any, trainable: Callable[[tuple[str, ...]], bool]) -> tuple[Any, Any]:
  """(trainable, frozen) nested dicts by a predicate on the leaf's path."""
  flat = traverse_util.flatten_dict(params)
  t = {k: v for k, v in flat.items() if trainable(k)}
  f = {k: v for k, v in flat.items() if not trainable(k)}
  return traverse_util.unflatten_dict(t), traverse_util.unflatten_dict(f)


def combine(a: Any, b: Any) -> Any:
  return traverse_util.unflatten_dict(
    {**traverse_util.flatten_dict(a), **traverse_util.flatten_dict(b)}
  )


def roberta_base_config(layers: int, seq: int) -> dict[str, Any]:
  """RoBERTa-base widths with ``layers`` layers, as keyword arguments of ``RobertaConfig``."""
  return dict(
    vocab_size=50265,
    hidden_size=768,
    num_hidden_layers=layers,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=max(514, seq + 2),
    num_labels=2,
  )


def model_parser(description: str, repeats: int) -> argparse.ArgumentParser:
  """The model-level benchmarks' shared flags (RoBERTa-base widths; layers, sequence, batch)."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--block-size", type=int, default=128)
  p.add_argument("--repeats", type=int, default=repeats)
  return p
