"""One call that measures a GPU: the ceilings, the GPU test tier, the layer table; JSON + markdown.

On an NVIDIA H200 (jax with CUDA, flax, optax, torch and peft installed there; the project is not
pip-installed), from the repository root, in one call of at most 6 minutes:

    PYTHONPATH=. python3 benchmarks/accelerator.py --out $OUT

It writes ``$OUT/accelerator.json`` (every figure, the machine, the method, each error's first
line, what the budget skipped) and ``$OUT/accelerator.md`` (the same as tables), both rewritten
after each phase (atomically), and prints the tables and the targets' verdicts last. The phases,
in this order, each inside one budget (``--budget-s``, default 330 s, counted once the imports
are done; what does not fit is skipped and named in both files):

  1. the machine: the device's kind (``jax.devices()[0].device_kind``), the jax, jaxlib and flax
     versions, the date;
  2. the ceilings: a bfloat16 8192^3 matmul (TFLOP/s) and a 1 GiB float32 ``x + 1`` (TB/s,
     bytes read plus written);
  3. the layer table in bfloat16 (activations, frozen kernel and cotangent bfloat16, the C3A
     kernel float32): one adapted layer, forward + backward, 16,384 tokens, for (d_in, d_out, b)
     = (4096, 4096, 256), (4096, 11008, 256), (768, 768, 128), (4096, 4096, 64): frozen
     (``x @ W``, dL/dx), LoRA r=16 (``x @ W + (x @ A) @ B * 2``, grads wrt x, A, B), C3A as a
     user runs it (``model.apply`` of a one-Dense linen model under
     ``c3a.intercept(strategy=s)``, grads wrt the C3A kernel and x) for every ``s`` in
     ``c3a_jax.ops.STRATEGIES``, and the experimental Pallas kernel added to ``x @ W``
     (``c3a_jax.experimental.pallas.apply``; off CPU, or with ``--pallas``);
  4. precision: each strategy's C3A delta alone (``ops.block_circulant_matmul``) on the first
     128 tokens of each float32 layer, against a float64 numpy reference, at XLA's default
     matmul precision;
  5. the GPU test tier: ``python -m pytest -n 4 -q -rfE -p no:cacheprovider`` (without ``-n``
     where pytest-xdist is missing) with ``XLA_PYTHON_CLIENT_PREALLOCATE=false``, for at most
     ``--tests-timeout-s`` (180 s; then interrupted, its partial summary kept);
  6. the layer table in float32, with each strategy's delta inside the layer (adapted output
     minus frozen output) against the same float64 reference;
  7. PEFT's C3A and LoRA r=16 on torch, on the same card, for the bfloat16 layers;
  8. the targets of the accelerators issue, with verdicts.

Timing: every jitted function takes all its arrays as arguments; each sample is ``--calls`` (20)
back-to-back calls waited for once (``jax.block_until_ready``, ``torch.cuda.synchronize``),
divided by the calls; the functions of one layer run round-robin for ``--repeats`` (7) rounds
after a warm-up; times are medians over rounds, and extra = the median over rounds of
t / t_frozen, less 1. Inputs are random normal (never zeros). Any error (a compile failure, out
of memory, a shared-memory limit) is recorded as its first line, never a crash.

Narrower calls: ``--no-tests``, ``--no-peft``, ``--dtypes bfloat16``, ``--layers 4096x4096x256``,
``--test-args "tests/test_ops.py"``, ``--budget-s``, ``--tests-timeout-s``; ``--help`` for all.

On CPU, at toy sizes (checks the script; its figures mean nothing; about 20 s on 2 cores):

    python benchmarks/accelerator.py --toy --no-tests --out /tmp/accelerator
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

# The test tier's processes share the GPU with this one: no process takes 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fwd_bwd, machine, machine_info, markdown_table, ratios, rounds

import c3a_jax as c3a
from c3a_jax import ops

START = time.monotonic()  # the budget counts from here (importing jax took a few seconds)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# The layers, those with a target first (the budget may not reach the last).
LAYERS = [(4096, 4096, 256), (4096, 11008, 256), (768, 768, 128), (4096, 4096, 64)]
TOY_LAYERS = [(64, 64, 16), (64, 128, 16)]
LORA_RANK = 16
LORA_SCALE = 2.0  # alpha = 2 * rank, as PEFT's LoRA is usually set up
# Targets of the accelerators issue: the bfloat16 C3A layer under "auto", (d_in, d_out, b) ->
# (extra over frozen at most, stretch or None).
EXTRA_TARGETS = {
  (4096, 4096, 256): (1.0, 0.5),
  (4096, 11008, 256): (0.6, None),
  (768, 768, 128): (3.0, None),
}
AUTO_SLACK = 0.10  # "auto" within 10% of the fastest strategy
DELTA_RELERR = 1e-5  # a float32 delta against float64


def first_line(e: BaseException) -> str:
  """An error as one line: its type and the first line of its message."""
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0] if lines else ''}"[:400]


def left(args) -> float:
  """Seconds of the budget left."""
  return args.budget_s - (time.monotonic() - START)


def log(*parts: Any) -> None:
  print(f"[{time.monotonic() - START:6.1f}s]", *parts, flush=True)


# ---------------------------------------------------------------------------------------------
# Ceilings


def ceilings(args) -> dict[str, Any]:
  """The bf16 matmul rate and the copy bandwidth, each timed as the layers are."""
  out: dict[str, Any] = {}
  ka, kb, kc = jax.random.split(jax.random.key(1), 3)
  n = args.matmul_n
  try:
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    t = statistics.median(
      rounds({"mm": lambda: mm(a, b)}, args.repeats, warmup=2, calls=args.calls)["mm"]
    )
    out["bf16_matmul"] = {"n": n, "ms": t * 1e3, "tflops": 2 * n**3 / t / 1e12}
  except Exception as e:
    out["bf16_matmul"] = {"n": n, "error": first_line(e)}
  elems = args.copy_mib * 2**20 // 4
  try:
    x = jax.random.normal(kc, (elems,), jnp.float32)
    add = jax.jit(lambda x: x + 1.0)
    t = statistics.median(
      rounds({"copy": lambda: add(x)}, args.repeats, warmup=2, calls=args.calls)["copy"]
    )
    moved = 2 * elems * 4  # read once, written once
    out["copy"] = {"bytes": moved, "ms": t * 1e3, "TBps": moved / t / 1e12}
  except Exception as e:
    out["copy"] = {"bytes": 2 * elems * 4, "error": first_line(e)}
  return out


# ---------------------------------------------------------------------------------------------
# The layer table


def layer_data(d_in: int, d_out: int, b: int, tokens: int, dtype: Any) -> dict[str, jax.Array]:
  """The layer's arrays, random normal; the same seed for every dtype (so a float32 layer's x
  and w are those of the precision check)."""
  ks = jax.random.split(jax.random.key(0), 6)
  return {
    "x": jax.random.normal(ks[0], (tokens, d_in), jnp.float32).astype(dtype),
    "W": (jax.random.normal(ks[1], (d_in, d_out)) / d_in**0.5).astype(dtype),
    "g": jax.random.normal(ks[2], (tokens, d_out), jnp.float32).astype(dtype),
    "w": jax.random.normal(ks[3], (d_out // b, d_in // b, b), jnp.float32),
    "A": (jax.random.normal(ks[4], (d_in, LORA_RANK)) / d_in**0.5).astype(dtype),
    "B": (jax.random.normal(ks[5], (LORA_RANK, d_out)) / LORA_RANK**0.5).astype(dtype),
  }


def frozen(x, W):
  return x @ W


def lora(x, A, B, W):
  return x @ W + ((x @ A) @ B) * LORA_SCALE


def c3a_layer(model: nn.Module, strategy: str, w, x, W):
  """The adapted Dense as a user runs it: model.apply under c3a.intercept."""
  with c3a.intercept(strategy=strategy):
    return model.apply({"params": {"kernel": W, "c3a_kernel": w}}, x)


def pallas_layer(w, x, W, *, as_float32: bool = False):
  """``x @ W`` plus the experimental Pallas kernel's delta (common.pallas_interceptor's sum)."""
  from c3a_jax.experimental import pallas

  y = x @ W
  return y + pallas.apply(x.astype(jnp.float32) if as_float32 else x, w).astype(y.dtype)


def dense_delta64(w: Any) -> np.ndarray:
  """C3A's delta in float64, ``(d_in, d_out)``: delta[i*b + r, j*b + c] = w[i, j, (c - r) mod b]
  / d_in in the (out, in) layout (c3a_jax.ops' docstring), transposed."""
  w = np.asarray(w, np.float64)
  m, n, b = w.shape
  idx = (np.arange(b)[None, :] - np.arange(b)[:, None]) % b  # [r, c] -> (c - r) mod b
  out_in = w[:, :, idx].transpose(0, 2, 1, 3).reshape(m * b, n * b) / (n * b)
  return out_in.T


_REFS: dict[tuple[int, ...], np.ndarray] = {}


def reference(d_in: int, d_out: int, b: int, tokens: int, data: dict[str, jax.Array], p: int):
  """float64 ``x[:p] @ delta`` for the float32 layer's data, cached per layer."""
  key = (d_in, d_out, b, tokens, p)
  if key not in _REFS:
    x64 = np.asarray(data["x"][:p].astype(jnp.float32), np.float64)
    _REFS[key] = x64 @ dense_delta64(data["w"])
  return _REFS[key]


def relerr(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
  """max |got - ref| / max |ref|, and the same in the Frobenius norm."""
  got = np.asarray(got, np.float64)
  return {
    "max": float(np.max(np.abs(got - ref)) / np.max(np.abs(ref))),
    "fro": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
  }


def measure_layer(args, d_in: int, d_out: int, b: int, dtype: Any) -> dict[str, Any]:
  """One row of the table: each function's median ms and extra over frozen, errors, notes."""
  tokens, name = args.tokens, jnp.dtype(dtype).name
  row: dict[str, Any] = {
    "dtype": name,
    "d_in": d_in,
    "d_out": d_out,
    "b": b,
    "tokens": tokens,
    "ms": {},
    "extra": {},
    "errors": {},
    "notes": [],
  }
  m, n = d_out // b, d_in // b
  folds = ops.can_fold(dtype)
  row["can_fold"] = bool(folds)
  row["auto_picks"] = ops.choose_strategy((tokens, d_in), (m, n, b), with_base=folds)
  data = layer_data(d_in, d_out, b, tokens, dtype)
  x, W, g, w, A, B = (data[k] for k in "xWgwAB")
  model = nn.Dense(d_out, use_bias=False)
  fns: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "frozen": (fwd_bwd(frozen, argnums=(0,)), (x, W, g)),
    "lora16": (fwd_bwd(lora, argnums=(0, 1, 2)), (x, A, B, W, g)),
  }
  for s in ops.STRATEGIES:
    f = functools.partial(c3a_layer, model, s)
    fns[f"c3a_{s}"] = (fwd_bwd(f, argnums=(0, 1)), (w, x, W, g))
  if args.pallas:
    fns["pallas"] = (fwd_bwd(pallas_layer, argnums=(0, 1)), (w, x, W, g))
  p = min(args.precision_tokens, tokens)
  check = name == "float32"
  ys: dict[str, np.ndarray] = {}
  # Compile and run each once; an error takes that function out of the timing.
  for key in list(fns):
    f, fargs = fns[key]
    if left(args) <= 0:
      row["errors"][key] = "skipped: the budget is spent"
      del fns[key]
      continue
    try:
      y, _ = jax.block_until_ready(f(*fargs))
    except Exception as e:
      if key == "pallas" and name != "float32":
        try:
          f = fwd_bwd(functools.partial(pallas_layer, as_float32=True), argnums=(0, 1))
          y, _ = jax.block_until_ready(f(*fargs))
          fns[key] = (f, fargs)
          row["notes"].append(
            f"pallas.apply raised for {name} x ({first_line(e)}); timed with x cast to float32"
          )
        except Exception as e2:
          row["errors"][key] = f"{first_line(e2)} (with {name} x: {first_line(e)})"
          del fns[key]
          continue
      else:
        row["errors"][key] = first_line(e)
        del fns[key]
        continue
    if check:
      ys[key] = np.asarray(y[:p], np.float64)
    del y
  if "frozen" not in fns:
    return row
  calls = {k: (lambda f=f, a=fargs: f(*a)) for k, (f, fargs) in fns.items()}
  # The frozen layer once more, last in each round: its "extra" is the timing's noise.
  calls["frozen_again"] = calls["frozen"]
  try:
    times = rounds(calls, args.repeats, warmup=1, calls=args.calls)
  except Exception as e:
    row["errors"]["timing"] = first_line(e)
    return row
  rel = ratios(times, "frozen")
  row["noise"] = rel.pop("frozen_again") - 1.0
  for k, v in times.items():
    if k in rel:
      row["ms"][k] = statistics.median(v) * 1e3
    if k not in ("frozen", "frozen_again"):
      row["extra"][k] = rel[k] - 1.0
  timed = [s for s in ops.STRATEGIES if s != "auto" and f"c3a_{s}" in times]
  if timed and "c3a_auto" in times:
    fastest = min(timed, key=lambda s: row["ms"][f"c3a_{s}"])
    row["fastest"] = fastest
    row["auto_vs_fastest"] = ratios(times, f"c3a_{fastest}")["c3a_auto"] - 1.0
    row["auto_within_10pct"] = bool(row["auto_vs_fastest"] <= AUTO_SLACK)
  if check and "frozen" in ys:
    ref = reference(d_in, d_out, b, tokens, data, p)
    row["in_layer_relerr"] = {
      k[4:] if k.startswith("c3a_") else k: relerr(ys[k] - ys["frozen"], ref)
      for k in ys
      if k not in ("frozen", "lora16")
    }
  return row


def floor_extra(row: dict[str, Any], ceil: dict[str, Any]) -> float | None:
  """The adapter's physical floor as an extra over frozen: reading x and g again and writing
  the additions to y and dx, at the measured copy bandwidth (DESIGN.md section 10)."""
  tbps = ceil.get("copy", {}).get("TBps")
  t = row["ms"].get("frozen")
  if not tbps or not t:
    return None
  size = jnp.dtype(row["dtype"]).itemsize
  moved = size * row["tokens"] * 2 * (row["d_in"] + row["d_out"])
  return moved / (tbps * 1e12) / (t * 1e-3)


def layer_table(args, dtype: Any, result: dict[str, Any], save) -> None:
  """Every layer in ``dtype``, as the budget allows."""
  name = jnp.dtype(dtype).name
  durations = result.setdefault("_durations", {})
  for d_in, d_out, b in args.layers:
    label = f"{name} {d_in}x{d_out} b={b}"
    other = [v for (i, o, bb, _), v in durations.items() if (i, o, bb) == (d_in, d_out, b)]
    need = 1.5 * max(other) if other else max(durations.values(), default=0.0)
    if left(args) < max(need, 5.0):
      result["skipped"].append(f"layer {label}: {left(args):.0f} s left, ~{need:.0f} s needed")
      log("skip", label)
      continue
    t0 = time.monotonic()
    try:
      row = measure_layer(args, d_in, d_out, b, dtype)
    except Exception as e:  # anything measure_layer did not catch itself
      row = {"dtype": name, "d_in": d_in, "d_out": d_out, "b": b, "tokens": args.tokens}
      row.update(ms={}, extra={}, errors={"row": first_line(e)}, notes=[])
    row["floor_extra"] = floor_extra(row, result["ceilings"])
    row["seconds"] = time.monotonic() - t0
    durations[(d_in, d_out, b, name)] = row["seconds"]
    result["layers"].append(row)
    log(label, summary_line(row))
    gc.collect()
    save()


def summary_line(row: dict[str, Any]) -> str:
  e = row["extra"]
  parts = [f"frozen {row['ms'].get('frozen', float('nan')):.3f} ms"]
  parts += [f"{k} {v:+.2f}" for k, v in e.items()]
  if row["errors"]:
    parts.append(f"errors: {', '.join(row['errors'])}")
  return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Precision


def precision(args) -> list[dict[str, Any]]:
  """Each strategy's delta alone on a float32 layer's first tokens, against float64."""
  out = []
  p = min(args.precision_tokens, args.tokens)
  for d_in, d_out, b in args.layers:
    rec: dict[str, Any] = {"d_in": d_in, "d_out": d_out, "b": b, "tokens": p, "relerr": {}}
    rec["errors"] = {}
    try:
      data = layer_data(d_in, d_out, b, args.tokens, jnp.float32)
      x, w = data["x"][:p], data["w"]
      ref = reference(d_in, d_out, b, args.tokens, data, p)
      names = [*ops.STRATEGIES, *(["pallas"] if args.pallas else [])]
      for s in names:
        try:
          if s == "pallas":
            from c3a_jax.experimental import pallas

            f = jax.jit(pallas.apply)
          else:
            f = jax.jit(functools.partial(ops.block_circulant_matmul, strategy=s))
          rec["relerr"][s] = relerr(np.asarray(f(x, w)), ref)
        except Exception as e:
          rec["errors"][s] = first_line(e)
    except Exception as e:
      rec["errors"]["layer"] = first_line(e)
    out.append(rec)
  return out


# ---------------------------------------------------------------------------------------------
# The test tier


def parse_pytest(output: str) -> dict[str, Any]:
  """Counts from pytest's closing line and the ids of the FAILED / ERROR lines (``-rfE``)."""
  failed, counts, closing = [], {}, None
  for line in output.splitlines():
    if line.startswith(("FAILED ", "ERROR ")):
      test = line.split(" ", 1)[1].split(" - ", 1)[0].strip()
      failed.append(f"{line.split(' ', 1)[0]} {test}")
  pattern = r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)\b"
  for line in reversed(output.splitlines()):
    found = re.findall(pattern, line)
    if (found or "no tests ran" in line) and re.search(r"\bin [\d.]+s\b", line):
      closing = line.strip(" =")
      for num, what in found:
        what = {"error": "errors", "warning": "warnings"}.get(what, what)
        counts[what] = int(num)
      break
  return {"counts": counts, "failed": failed, "closing_line": closing}


def test_tier(args, limit_s: float) -> dict[str, Any]:
  """The default tier as a subprocess on this backend, interrupted (SIGINT, so that pytest
  prints its summary) after ``limit_s``."""
  try:
    import xdist  # noqa: F401

    spread = ["-n", str(args.test_workers)]
  except ImportError:
    # The ini's addopts name xdist's --dist: drop them, keep the tier's marker expression.
    spread = ["-o", "addopts=-m 'not integration'"]
  cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *spread]
  cmd += shlex.split(args.test_args)
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
  rec: dict[str, Any] = {"command": shlex.join(cmd[1:]), "limit_s": round(limit_s, 1)}
  log("tests:", rec["command"], f"(at most {limit_s:.0f} s)")
  t0 = time.monotonic()
  proc = subprocess.Popen(
    cmd,
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    start_new_session=True,
  )
  try:
    out, _ = proc.communicate(timeout=limit_s)
    rec["timed_out"] = False
  except subprocess.TimeoutExpired:
    rec["timed_out"] = True
    proc.send_signal(signal.SIGINT)  # pytest stops and prints what it has
    try:
      out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)  # its own session: pytest and its workers
      out, _ = proc.communicate()
  rec["seconds"] = time.monotonic() - t0
  rec["returncode"] = proc.returncode
  rec.update(parse_pytest(out))
  rec["tail"] = out[-3000:]
  return rec


# ---------------------------------------------------------------------------------------------
# PEFT on torch


def peft_torch(args, result: dict[str, Any]) -> dict[str, Any]:
  """PEFT's C3A and LoRA r=16 on torch, the bfloat16 layers, as the budget allows."""
  try:
    import peft
    import torch
  except ImportError as e:
    return {"skipped": f"torch or peft does not import: {first_line(e)}"}
  device = args.torch_device
  if device == "cuda" and not torch.cuda.is_available():
    return {"skipped": "torch sees no CUDA device"}
  from peft_layer import torch_fns

  sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
  rec: dict[str, Any] = {"torch": torch.__version__, "peft": peft.__version__, "device": device}
  rec["rows"] = []
  for d_in, d_out, b in args.layers:
    label = f"{d_in}x{d_out} b={b}"
    if left(args) < 15:
      result["skipped"].append(f"PEFT {label}: {left(args):.0f} s left")
      continue
    row: dict[str, Any] = {"d_in": d_in, "d_out": d_out, "b": b, "tokens": args.tokens}
    row["dtype"] = "bfloat16"
    same = [
      r
      for r in result["layers"]
      if r["dtype"] == "bfloat16" and (r["d_in"], r["d_out"], r["b"]) == (d_in, d_out, b)
    ]
    if same:  # this layer in the jax table, for comparison
      row["jax_frozen_ms"] = same[0]["ms"].get("frozen")
      row["jax_auto_extra"] = same[0]["extra"].get("c3a_auto")
    try:
      steps = torch_fns(d_in, d_out, args.tokens, b, "bfloat16", device, LORA_RANK)
      times = rounds(steps, args.repeats, warmup=2, calls=args.calls, sync=sync)
      rel = ratios(times, "frozen")
      row["ms"] = {k: statistics.median(v) * 1e3 for k, v in times.items()}
      row["extra"] = {k: rel[k] - 1.0 for k in times if k != "frozen"}
      del steps
    except Exception as e:
      row["error"] = first_line(e)
    rec["rows"].append(row)
    log("PEFT", label, row.get("extra", row.get("error")))
    if device == "cuda":
      torch.cuda.empty_cache()
  return rec


# ---------------------------------------------------------------------------------------------
# Targets and the report


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
  """The issue's targets, each with its measured value and a verdict."""
  out = []
  rows = result["layers"]
  for (d_in, d_out, b), (limit, stretch) in EXTRA_TARGETS.items():
    what = f"bf16 C3A auto extra, {d_in}x{d_out} b={b}: <= {limit}"
    if stretch is not None:
      what += f" (stretch {stretch})"
    row = next(
      (
        r
        for r in rows
        if r["dtype"] == "bfloat16" and (r["d_in"], r["d_out"], r["b"]) == (d_in, d_out, b)
      ),
      None,
    )
    value = None if row is None else row["extra"].get("c3a_auto")
    if value is None:
      verdict = "not measured"
    else:
      verdict = "met" if value <= limit else "NOT met"
      if stretch is not None:
        verdict += ", stretch met" if value <= stretch else ", stretch not met"
    out.append({"target": what, "value": value, "verdict": verdict})
  judged = [r for r in rows if "auto_within_10pct" in r]
  misses = [
    f"{r['dtype']} {r['d_in']}x{r['d_out']} b={r['b']}: auto {r['auto_picks']} "
    f"{r['auto_vs_fastest']:+.0%} vs {r['fastest']}"
    for r in judged
    if not r["auto_within_10pct"]
  ]
  out.append(
    {
      "target": "auto within 10% of the fastest strategy at every shape",
      "value": max((r["auto_vs_fastest"] for r in judged), default=None),
      "verdict": "not measured"
      if not judged
      else ("met" if not misses else "NOT met: " + "; ".join(misses))
      + ("" if len(judged) == len(rows) and rows else f" ({len(judged)} of {len(rows)} rows)"),
    }
  )
  errs = [
    (v["max"], f"{p['d_in']}x{p['d_out']} b={p['b']} {s}")
    for p in result.get("precision") or []
    for s, v in p["relerr"].items()
    if s in ops.STRATEGIES
  ]
  worst = max(errs, default=None)
  out.append(
    {
      "target": f"float32 delta relative error <= {DELTA_RELERR:g} (each strategy, delta alone)",
      "value": None if worst is None else worst[0],
      "verdict": "not measured"
      if worst is None
      else (
        "met"
        if worst[0] <= DELTA_RELERR
        else "NOT met: "
        + "; ".join(f"{w} {e:.1e}" for e, w in sorted(errs, reverse=True) if e > DELTA_RELERR)
      ),
    }
  )
  return out


def fmt_extra(row: dict[str, Any], key: str) -> str:
  if key in row["extra"]:
    return f"{row['extra'][key]:+.3f}"
  return "error" if key in row["errors"] else "-"


def markdown(result: dict[str, Any]) -> str:
  """The report: machine, ceilings, a table per dtype, precision, PEFT, tests, targets."""
  lines = [f"# Accelerator measurements: {result['machine_line']}", ""]
  lines += [f"Command: `{result['command']}`", "", f"Method: {result['method']}", ""]
  c = result.get("ceilings") or {}
  mm, cp = c.get("bf16_matmul", {}), c.get("copy", {})
  lines += ["## Ceilings", ""]
  if "tflops" in mm:
    lines.append(f"- bf16 matmul {mm['n']}^3: {mm['tflops']:.1f} TFLOP/s ({mm['ms']:.3f} ms)")
  elif mm:
    lines.append(f"- bf16 matmul: {mm.get('error')}")
  if "TBps" in cp:
    lines.append(
      f"- copy (x + 1, {cp['bytes'] / 2**30:.2f} GiB read + written): {cp['TBps']:.3f} TB/s"
    )
  elif cp:
    lines.append(f"- copy: {cp.get('error')}")
  lines.append("")
  strategies = [f"c3a_{s}" for s in ops.STRATEGIES]
  for dtype in ("bfloat16", "float32"):
    rows = [r for r in result["layers"] if r["dtype"] == dtype]
    if not rows:
      continue
    extras = ["lora16", *strategies, "pallas"]
    header = ["layer", "b", "frozen ms", "noise", "floor", "LoRA r=16", "auto", "auto picks"]
    header += [*(s[4:] for s in strategies[1:]), "pallas", "fastest", "auto vs fastest"]
    table = []
    for r in rows:
      cells = {k: fmt_extra(r, k) for k in extras}
      floor = r.get("floor_extra")
      table.append(
        [
          f"{r['d_in']}x{r['d_out']}",
          r["b"],
          f"{r['ms']['frozen']:.3f}" if "frozen" in r["ms"] else "error",
          f"{r['noise']:+.3f}" if "noise" in r else "-",
          "-" if floor is None else f"{floor:.3f}",
          cells["lora16"],
          cells["c3a_auto"],
          r["auto_picks"],
          *(cells[s] for s in strategies[1:]),
          cells["pallas"],
          r.get("fastest", "-"),
          f"{r['auto_vs_fastest']:+.1%}" if "auto_vs_fastest" in r else "-",
        ]
      )
    tokens = rows[0]["tokens"]
    lines += [f"## {dtype}, {tokens} tokens: extra = (t - frozen) / frozen", ""]
    lines += [markdown_table(header, table), ""]
    lines.append(
      "noise: the frozen layer timed again in the same rounds, as an extra over itself; floor: "
      "reading x and g again and writing y's and dx's additions at the copy bandwidth, as an "
      "extra over frozen."
    )
    for r in rows:
      label = f"{r['d_in']}x{r['d_out']} b={r['b']}"
      for k, v in r["errors"].items():
        lines.append(f"- {label} {k}: {v}")
      for note in r["notes"]:
        lines.append(f"- {label}: {note}")
    if dtype == "float32" and any("in_layer_relerr" in r for r in rows):
      lines += ["", "Delta inside the layer (adapted - frozen output) vs float64, max-relative:"]
      for r in rows:
        errs = r.get("in_layer_relerr", {})
        lines.append(
          f"- {r['d_in']}x{r['d_out']} b={r['b']}: "
          + ", ".join(f"{k} {v['max']:.1e}" for k, v in errs.items())
        )
    lines.append("")
  if result.get("precision"):
    names = [*ops.STRATEGIES, "pallas"]
    lines += ["## float32 delta alone vs float64 (max |err| / max |ref|)", ""]
    table = []
    for p in result["precision"]:
      cells = [
        f"{p['relerr'][s]['max']:.1e}" if s in p["relerr"] else "error" if s in p["errors"] else "-"
        for s in names
      ]
      table.append([f"{p['d_in']}x{p['d_out']}", p["b"], p["tokens"], *cells])
    lines += [markdown_table(["layer", "b", "tokens", *names], table), ""]
    for p in result["precision"]:
      for k, v in p["errors"].items():
        lines.append(f"- {p['d_in']}x{p['d_out']} b={p['b']} {k}: {v}")
  pt = result.get("peft_torch")
  if pt:
    lines += ["## PEFT on torch, bfloat16, same card", ""]
    if "skipped" in pt:
      lines += [f"Skipped: {pt['skipped']}", ""]
    else:
      lines += [f"torch {pt['torch']}, peft {pt['peft']}, device {pt['device']}", ""]
      table = [
        [
          f"{r['d_in']}x{r['d_out']}",
          r["b"],
          f"{r['ms']['frozen']:.3f}" if "ms" in r else r.get("error", "-"),
          f"{r['extra']['c3a']:+.3f}" if "extra" in r else "-",
          f"{r['extra']['lora']:+.3f}" if "extra" in r else "-",
          f"{r['jax_frozen_ms']:.3f}" if r.get("jax_frozen_ms") else "-",
          f"{r['jax_auto_extra']:+.3f}" if r.get("jax_auto_extra") is not None else "-",
        ]
        for r in pt["rows"]
      ]
      header = ["layer", "b", "torch frozen ms", "PEFT C3A extra", "PEFT LoRA r=16 extra"]
      header += ["jax frozen ms", "c3a-jax auto extra"]
      lines += [markdown_table(header, table), ""]
  t = result.get("tests")
  if t:
    lines += ["## GPU test tier", ""]
    if "skipped" in t or "error" in t:
      lines += [f"Skipped: {t['skipped']}" if "skipped" in t else f"Error: {t['error']}", ""]
    else:
      counts = ", ".join(f"{v} {k}" for k, v in t["counts"].items()) or "no closing line"
      lines.append(
        f"`{t['command']}`: {counts} in {t['seconds']:.0f} s"
        + (" (interrupted at the time limit)" if t["timed_out"] else "")
      )
      lines += [f"- {f}" for f in t["failed"]] + [""]
  lines += ["## Targets", ""]
  table = [
    [t["target"], "-" if t["value"] is None else f"{t['value']:.3g}", t["verdict"]]
    for t in result.get("targets", [])
  ]
  lines += [markdown_table(["target", "measured", "verdict"], table), ""]
  if result["skipped"]:
    lines += ["## Skipped", ""] + [f"- {s}" for s in result["skipped"]] + [""]
  lines.append(f"Total: {result.get('seconds', 0):.0f} s of a {result['budget_s']:.0f} s budget.")
  return "\n".join(lines) + "\n"


def write_atomic(path: str, text: str) -> None:
  """``text`` to ``path`` through a temporary file in the same folder and os.replace."""
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 is for secrets; this is a report
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def save(args, result: dict[str, Any]) -> None:
  result["seconds"] = time.monotonic() - START
  result["targets"] = targets(result)
  public = {k: v for k, v in result.items() if not k.startswith("_")}
  write_atomic(os.path.join(args.out, "accelerator.json"), json.dumps(public, indent=1) + "\n")
  write_atomic(os.path.join(args.out, "accelerator.md"), markdown(result))


# ---------------------------------------------------------------------------------------------


def parse_layers(text: str) -> list[tuple[int, int, int]]:
  """``"4096x4096x256,768x768x128"`` -> [(4096, 4096, 256), (768, 768, 128)]."""
  out = []
  for item in text.split(","):
    d_in, d_out, b = (int(v) for v in item.lower().split("x"))
    if d_in % b or d_out % b:
      raise argparse.ArgumentTypeError(f"{item}: b must divide d_in and d_out")
    out.append((d_in, d_out, b))
  return out


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=HERE, help="folder for accelerator.json and .md")
  p.add_argument("--budget-s", type=float, default=330.0, help="for everything, from the start")
  p.add_argument("--toy", action="store_true", help="small sizes (for CPU)")
  p.add_argument("--layers", type=parse_layers, help="d_inxd_outxb,... (default: the issue's)")
  p.add_argument("--tokens", type=int)
  p.add_argument("--dtypes", default="bfloat16,float32")
  p.add_argument("--repeats", type=int, help="interleaved rounds (7; toy 3)")
  p.add_argument("--calls", type=int, help="back-to-back calls per sample (20; toy 2)")
  p.add_argument("--matmul-n", type=int, help="the ceiling's matmul size (8192; toy 256)")
  p.add_argument("--copy-mib", type=int, help="the ceiling's copied array (1024; toy 16)")
  p.add_argument("--precision-tokens", type=int, default=128)
  pallas = p.add_mutually_exclusive_group()
  pallas.add_argument("--pallas", action="store_true", default=None, help="(default: off CPU)")
  pallas.add_argument("--no-pallas", dest="pallas", action="store_false")
  p.add_argument("--no-tests", action="store_true", help="skip the test tier")
  p.add_argument("--tests-timeout-s", type=float, default=180.0)
  p.add_argument("--test-workers", type=int, default=4)
  p.add_argument("--test-args", default="", help="more pytest arguments, e.g. test files")
  p.add_argument("--no-peft", action="store_true", help="skip PEFT on torch")
  p.add_argument("--torch-device", default="cuda", help="cuda; cpu to check the code path")
  return p


def main(argv: list[str] | None = None) -> None:
  args = parser().parse_args(argv)
  toy = args.toy
  args.layers = args.layers or (TOY_LAYERS if toy else LAYERS)
  args.tokens = args.tokens or (256 if toy else 16384)
  args.repeats = args.repeats or (3 if toy else 7)
  args.calls = args.calls or (2 if toy else 20)
  args.matmul_n = args.matmul_n or (256 if toy else 8192)
  args.copy_mib = args.copy_mib or (16 if toy else 1024)
  if args.pallas is None:
    args.pallas = jax.default_backend() != "cpu"
  dtypes = [jnp.dtype(d) for d in args.dtypes.split(",") if d]
  os.makedirs(args.out, exist_ok=True)
  info = machine_info()
  result: dict[str, Any] = {
    "command": shlex.join([os.path.relpath(sys.argv[0], ROOT), *(argv or sys.argv[1:])]),
    "machine": info,
    "machine_line": machine(),
    "method": (
      f"one adapted linen Dense (no bias), model.apply under c3a.intercept(strategy=s), "
      f"jax.vjp wrt (C3A kernel, x); frozen = x @ W with dL/dx; LoRA r={LORA_RANK} = x@W + "
      f"(x@A)@B*{LORA_SCALE:g} with grads wrt x, A, B; pallas = x@W + pallas.apply(x, w), "
      f"grads wrt (w, x); {args.tokens} tokens; every array a jit argument, random normal; "
      f"each time the median over {args.repeats} interleaved rounds of {args.calls} "
      f"back-to-back calls (one wait per sample); extra = median over rounds of t / t_frozen "
      f"- 1; XLA's default matmul precision "
      f"({getattr(jax.config, 'jax_default_matmul_precision', None) or 'default'})"
    ),
    "settings": {
      "layers": args.layers,
      "tokens": args.tokens,
      "dtypes": [d.name for d in dtypes],
      "repeats": args.repeats,
      "calls": args.calls,
      "pallas": args.pallas,
      "XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
      "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS"),
      "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
    },
    "budget_s": args.budget_s,
    "ceilings": {},
    "layers": [],
    "skipped": [],
  }
  log("machine:", result["machine_line"])
  persist = lambda: save(args, result)
  persist()

  result["ceilings"] = ceilings(args)
  log("ceilings:", result["ceilings"])
  persist()

  def table(dtype):
    if dtype in dtypes:
      layer_table(args, dtype, result, persist)

  table(jnp.dtype(jnp.bfloat16))
  if jnp.dtype(jnp.float32) in dtypes:
    if left(args) > 10:
      result["precision"] = precision(args)
      log("precision:", {f"{p['d_in']}x{p['d_out']}": p["relerr"] for p in result["precision"]})
    else:
      result["skipped"].append("precision: no time left")
    persist()
  if args.no_tests:
    result["tests"] = {"skipped": "--no-tests"}
  elif left(args) < 45:
    result["tests"] = {"skipped": f"{left(args):.0f} s left of the budget"}
    result["skipped"].append("the test tier: no time left")
  else:
    limit = min(args.tests_timeout_s, left(args) - 30)  # pytest's summary after SIGINT: <= 20 s
    try:
      result["tests"] = test_tier(args, limit)
    except Exception as e:
      result["tests"] = {"error": first_line(e), "counts": {}, "failed": []}
    log("tests:", result["tests"].get("closing_line"), f"{len(result['tests']['failed'])} failed")
  persist()
  table(jnp.dtype(jnp.float32))
  for d in dtypes:
    if d not in (jnp.bfloat16, jnp.float32):
      table(d)
  if args.no_peft:
    result["peft_torch"] = {"skipped": "--no-peft"}
  elif jnp.dtype(jnp.bfloat16) not in dtypes:
    result["peft_torch"] = {"skipped": "bfloat16 not among --dtypes"}
  else:
    try:
      result["peft_torch"] = peft_torch(args, result)
    except Exception as e:
      result["peft_torch"] = {"skipped": f"error: {first_line(e)}"}
  persist()
  text = markdown(result)
  print("\n" + text[text.index("## Ceilings") :], flush=True)
  log(f"wrote {os.path.join(args.out, 'accelerator.json')} and accelerator.md")


if __name__ == "__main__":
  main()
