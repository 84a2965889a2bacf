"""Against PEFT, layer by layer: what C3A adds to one adapted linear layer, in each framework.

For each (d_in, d_out, tokens, block size) it times, interleaved in one process, forward +
backward of:
  torch frozen   nn.Linear, weight frozen, dL/dx;
  PEFT C3A       the same layer wrapped by PEFT's C3A (dL/dx and dL/dc3a_kernel);
  jax frozen     x @ K, K frozen, dL/dx;
  c3a-jax        the adapted Dense as c3a.intercept runs it under "auto" (the fold where the
                 tokens pay for it: x @ (K + delta); else x @ K + the delta);
and prints each adapter's extra over its own framework's frozen layer (the median over rounds
of each round's ratio), and their ratio (the target in RESULTS.md: c3a-jax's extra <= 1/5 of
PEFT's). Both frameworks use every core.

    python benchmarks/peft_layer.py                     # the two LLM-width shapes (~3 minutes)
    python benchmarks/peft_layer.py --dtype bfloat16    # activations and frozen weights in bf16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

# PyTorch's OpenMP threads otherwise spin for a while after each step, taking the cores from
# the JAX run timed right after it; set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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

SHAPES = [(768, 768, 4096, 128), (4096, 4096, 2048, 256)]


def torch_fns(d_in, d_out, tokens, b, dtype, device="cpu", lora_rank=0):
  """Forward + backward steps of one linear layer in PyTorch on ``device``: {"frozen": ...,
  "c3a": PEFT's C3A} and, with ``lora_rank``, "lora": PEFT's LoRA of that rank (alpha twice
  the rank, both factors random, not B = 0)."""
  import peft
  import torch

  if device == "cpu":
    torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  tdtype = getattr(torch, dtype)

  def linear():
    return torch.nn.Sequential(torch.nn.Linear(d_in, d_out, dtype=tdtype, device=device))

  base = linear()
  base.requires_grad_(False)
  models = {
    "frozen": base,
    "c3a": peft.get_peft_model(
      linear(),
      peft.C3AConfig(block_size=b, target_modules=["0"], init_weights="xavier_uniform"),
    ),
  }
  if lora_rank:
    models["lora"] = peft.get_peft_model(
      linear(),
      peft.LoraConfig(
        r=lora_rank, lora_alpha=2 * lora_rank, target_modules=["0"], init_lora_weights=False
      ),
    )
  x = torch.randn(tokens, d_in, dtype=tdtype, device=device, requires_grad=True)
  g = torch.randn(tokens, d_out, dtype=tdtype, device=device)

  def step(model):
    def run():
      x.grad = None
      model.zero_grad(set_to_none=True)
      model(x).backward(g)

    return run

  return {k: step(m) for k, m in models.items()}


def jax_fns(d_in, d_out, tokens, b, dtype):
  """(frozen step, c3a-jax step), as benchmarks/layer.py times them."""
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (tokens, d_in), dtype)
  kernel = (jax.random.normal(keys[1], (d_in, d_out)) / d_in**0.5).astype(dtype)
  g = jax.random.normal(keys[2], (tokens, d_out), dtype)
  w = jax.random.normal(keys[3], (d_out // b, d_in // b, b), jnp.float32)
  frozen = fwd_bwd(lambda x, k: x @ jax.lax.stop_gradient(k))
  adapted, folds = adapted_dense(dtype, x.shape, w.shape)
  adapted = fwd_bwd(adapted)
  return (lambda: frozen(x, kernel, g)), (lambda: adapted(x, kernel, w, g)), folds


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  args = p.parse_args()
  load = wait_for_quiet()
  print(f"# machine: {machine()}\n# load when measuring: {load:.2f}\n", flush=True)
  rows = []
  for d_in, d_out, tokens, b in SHAPES:
    torch_steps = torch_fns(d_in, d_out, tokens, b, args.dtype)
    t_frozen, t_peft = torch_steps["frozen"], torch_steps["c3a"]
    j_frozen, j_c3a, folds = jax_fns(d_in, d_out, tokens, b, jnp.dtype(args.dtype))
    repeats = args.repeats if d_in * d_out * tokens < 2**34 else max(3, args.repeats // 2)
    times = rounds({"torch": t_frozen, "peft": t_peft, "jax": j_frozen, "c3a": j_c3a}, repeats)
    t = {k: statistics.median(v) for k, v in times.items()}
    peft_extra = ratios(times, "torch")["peft"] - 1
    c3a_extra = ratios(times, "jax")["c3a"] - 1
    rows.append(
      [
        f"{d_in}x{d_out}",
        tokens,
        b,
        f"{t['torch'] * 1e3:.1f}",
        f"{t['jax'] * 1e3:.1f}",
        peft_extra,
        c3a_extra,
        "fold" if folds else "auto",
        c3a_extra / peft_extra,
        "met" if c3a_extra <= peft_extra / 5 else "NOT met",
      ]
    )
    print_row(rows[-1])
  header = [
    "layer",
    "tokens",
    "b",
    "torch frozen ms",
    "jax frozen ms",
    "PEFT C3A extra",
    "c3a-jax extra",
    "c3a-jax path",
    "c3a-jax / PEFT",
    "target <= 0.2",
  ]
  print(
    f"\nExtra over each framework's frozen layer, fwd + bwd, {args.dtype} (median of "
    f"{args.repeats} interleaved rounds' ratios):\n"
  )
  print(markdown_table(header, rows))


if __name__ == "__main__":
  main()
