"""Layer level: forward + backward of one adapted Dense, as ratios to the frozen matmul.

For each (d_in, d_out, tokens, block size) it times, interleaved in one run (medians over
repeats):
  frozen   y = x @ K, and dL/dx (K frozen): what the adapter rides on;
  C3A      the delta alone, y = block_circulant_matmul(x, w), with dL/dx and dL/dw, per strategy;
  pallas   off CPU only, the same delta through the experimental fused kernel,
           c3a_jax.experimental.pallas.apply (not a strategy; interpret mode on CPU is far too
           slow to time);
  in Dense the whole adapted layer as the interceptor runs a float32 Dense under "auto" (with
           enough tokens y = x @ (K + delta), "fold"; else x @ K + the delta), with dL/dx
           and dL/dw; its cost is (time - frozen); also "fold" forced, for comparison;
  LoRA     the delta alone, y = (x @ A) @ B, with dL/dx, dL/dA, dL/dB, at rank 8 and at the rank
           whose parameter count equals C3A's (r = d_in * d_out / (b * (d_in + d_out))).
Ratios are adapter time / frozen time (lower is better), the median over rounds of each round's
ratio (steadier on a shared machine than a ratio of medians); for "in Dense", (adapted layer
time - frozen time) / frozen time: what C3A adds to the layer it adapts.

    python benchmarks/layer.py            # default grid (~4 minutes on 2 cores)
    python benchmarks/layer.py --quick    # the two target shapes only
    python benchmarks/layer.py --full     # larger grid: 16k tokens, 4096x11008, b up to 4096
    python benchmarks/layer.py --quick --dtype bfloat16   # activations and kernels in bf16

With ``--dtype bfloat16`` the activations, the frozen kernel, the cotangent and LoRA's factors
are bfloat16 and the C3A kernel float32, as in a bf16 training run. A bf16 Dense folds on CPU
only (XLA:CPU runs its matmul in float32 anyway; ops.can_fold); elsewhere "in Dense" is
x @ K + the delta (rounding W + delta to bf16 would lose the delta). Every timed function
returns the cotangent's dtype (common.fwd_bwd casts its output), so that a path that returns
float32 for a bf16 layer (ops.fold, the Pallas kernel where it does) pays the cast back.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
  adapted_dense,
  fwd_bwd,
  machine,
  markdown_table,
  print_row,
  ratios,
  rounds,
  wait_for_quiet,
)

from c3a_jax import ops
from c3a_jax.experimental import pallas

# The delta alone: block_circulant_matmul's strategies, then, off CPU, the experimental Pallas
# kernel (interpret mode on CPU is a test path, far too slow to time), then "auto" (last).
STRATEGIES = (
  "fft",
  "freq_major",
  "dense",
  *(("pallas",) if jax.default_backend() != "cpu" else ()),
  "auto",
)
QUICK = [(768, 768, 4096, 128), (4096, 4096, 2048, 256)]
DEFAULT = [
  (768, 768, 128, 128),
  (768, 768, 4096, 32),
  (768, 768, 4096, 128),
  (768, 768, 4096, 768),
  (4096, 4096, 2048, 32),
  (4096, 4096, 2048, 256),
  (4096, 4096, 2048, 4096),
  (4096, 11008, 512, 256),
]
FULL = [
  *DEFAULT,
  (768, 768, 16384, 128),
  (4096, 4096, 128, 256),
  (4096, 4096, 16384, 256),
  (4096, 11008, 2048, 128),
  (768, 768, 8, 128),
]
# RESULTS.md's targets: extra / frozen in float32; in bfloat16, BF16_TARGET x LoRA r=8's extra.
TARGETS = {(4096, 4096, 2048, 256): 0.1, (768, 768, 4096, 128): 0.3}
BF16_TARGET = 1.5


def measure(d_in, d_out, tokens, b, repeats, strategies=STRATEGIES, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 8)
  x = jax.random.normal(keys[0], (tokens, d_in), dtype)
  kernel = (jax.random.normal(keys[1], (d_in, d_out)) / d_in**0.5).astype(dtype)
  g = jax.random.normal(keys[2], (tokens, d_out), dtype)
  w = jax.random.normal(keys[3], (d_out // b, d_in // b, b), jnp.float32)
  r_same = max(1, round(d_in * d_out / (b * (d_in + d_out))))
  # The frozen layer first and the adapted ones right after it: each round's ratios compare
  # runs seconds apart, under the same load.
  fns = {
    "frozen": (lambda f: lambda: f(x, kernel, g))(
      fwd_bwd(lambda x, k: x @ jax.lax.stop_gradient(k))
    )
  }
  in_dense, folds = adapted_dense(dtype, x.shape, w.shape)
  folded = lambda x, k, w: ops.fold(x, w, jax.lax.stop_gradient(k)).astype(x.dtype)
  for name, f in (("in_dense", in_dense), ("fold_in_dense", folded)):
    fns[name] = (lambda f: lambda: f(x, kernel, w, g))(fwd_bwd(f))
  for name, r in (("lora8", 8), ("lora_same", r_same)):
    a = (jax.random.normal(keys[4], (d_in, r)) / d_in**0.5).astype(dtype)
    bb = (jax.random.normal(keys[5], (r, d_out)) / r**0.5).astype(dtype)
    f = fwd_bwd(lambda x, a, bb: (x @ a) @ bb)
    fns[name] = (lambda f, a, bb: lambda: f(x, a, bb, g))(f, a, bb)
  for s in strategies:
    if s == "pallas":
      f = fwd_bwd(lambda x, w: pallas.apply(x, w))
    else:
      f = fwd_bwd(lambda x, w, s=s: ops.block_circulant_matmul(x, w, strategy=s))
    fns[s] = (lambda f: lambda: f(x, w, g))(f)
  times = rounds(fns, repeats)
  medians = {k: statistics.median(v) for k, v in times.items()}
  return medians, ratios(times, "frozen"), r_same, folds


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  grid = p.add_mutually_exclusive_group()
  grid.add_argument("--quick", action="store_true")
  grid.add_argument("--full", action="store_true")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--json", help="also write the raw times here")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  args = p.parse_args()
  dtype = jnp.dtype(args.dtype)
  load = wait_for_quiet()
  print(f"# machine: {machine()}\n# load when measuring: {load:.2f}\n", flush=True)
  shapes = QUICK if args.quick else FULL if args.full else DEFAULT
  rows, raw = [], []
  for d_in, d_out, tokens, b in shapes:
    repeats = args.repeats if d_in * d_out * tokens < 2**34 else max(3, args.repeats // 2)
    t, rel, r_same, folds = measure(d_in, d_out, tokens, b, repeats, dtype=dtype)
    auto = ops.choose_strategy((tokens, d_in), (d_out // b, d_in // b, b))
    best = min(STRATEGIES[:-1], key=lambda s: t[s])
    target = TARGETS.get((d_in, d_out, tokens, b))
    rel["in_dense"] -= 1.0
    rel["fold_in_dense"] -= 1.0
    in_dense = "fold" if folds else auto
    if target is not None and dtype == jnp.bfloat16:
      target = round(BF16_TARGET * rel["lora8"], 3)  # bfloat16: against LoRA's own extra
    verdict = (
      ""
      if target is None
      else ("met" if rel["in_dense"] <= target else "NOT met") + f" (<= {target})"
    )
    rows.append(
      [
        f"{d_in}x{d_out}",
        tokens,
        b,
        f"{t['frozen'] * 1e3:.1f}",
        rel["in_dense"],
        in_dense,
        rel["fold_in_dense"],
        *(rel[s] for s in STRATEGIES),
        auto,
        best,
        rel["lora8"],
        f"{rel['lora_same']:.3f} (r={r_same})",
        rel["in_dense"] / rel["lora8"],
        rel["in_dense"] / rel["lora_same"],
        verdict,
      ]
    )
    raw.append(
      {
        "shape": [d_in, d_out],
        "tokens": tokens,
        "b": b,
        "seconds": t,
        "cost": rel,  # what the table shows: median per-round ratios, "in Dense" less 1
        "auto": auto,
        "in_dense_picks": in_dense,
        "r_same": r_same,
      }
    )
    print_row(rows[-1])
  header = [
    "layer",
    "tokens",
    "b",
    "frozen ms",
    "C3A in Dense (auto)",
    "picks",
    "fold in Dense",
    *(f"{s}/frozen" for s in STRATEGIES),
    "auto picks (alone)",
    "fastest",
    "LoRA r=8/frozen",
    "LoRA same-params/frozen",
    "C3A in Dense/LoRA r=8",
    "C3A in Dense/LoRA same",
    "target",
  ]
  print(
    f"\nAdapter forward+backward time / frozen matmul forward+backward, {args.dtype} (median "
    f"of {args.repeats} interleaved rounds' ratios):\n"
  )
  print(markdown_table(header, rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": machine(), "rows": raw}, f, indent=1)


if __name__ == "__main__":
  main()
