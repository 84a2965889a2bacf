"""Many adapters in one batch: a forward pass where each row runs its own C3A adapter.

RoBERTa-base widths (4 layers by default), batch 8 x seq 128, C3A (block 128) on query and
value. Timed interleaved in one run (medians over repeats), every array an argument of the
jitted function:
  one        the whole batch through one adapter, strategy "auto" (and "fft");
  mixed      the batch through a set of K adapters (c3a.stack_adapters), row r through adapter
             r % K (c3a.intercept(adapter_index=...)): the spectra gathered per row;
  separate   K forward passes, each over the rows of one adapter (what serving without a
             mixed batch does).
The ratio mixed / one is the cost of mixing (target <= 1.2 at K = 8).

    python benchmarks/mixed.py               # ~2 minutes on 2 cores
    python benchmarks/mixed.py --adapters 4
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved, machine, markdown_table, model_parser, wait_for_quiet
from model import build_model

import c3a_jax as c3a


def main() -> None:
  p = model_parser(__doc__.splitlines()[0], repeats=8)
  p.add_argument("--adapters", type=int, default=8)
  args = p.parse_args()
  load = wait_for_quiet()
  print(f"# machine: {machine()}\n# load when measuring: {load:.2f}", flush=True)
  model = build_model(args.layers, args.seq)
  cfg = c3a.C3AConfig(
    block_size=args.block_size, target_modules=["query", "value"], init_weights="gaussian"
  )
  k = args.adapters
  adapters = [
    c3a.split(c3a.attach(model.params, cfg, jax.random.key(i), model_type="roberta"))[0]
    for i in range(k)
  ]
  base = model.params
  stacked = c3a.stack_adapters({str(i): a for i, a in enumerate(adapters)})
  ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 3, 50265)
  index = jnp.arange(args.batch) % k

  def forward(adapter, base, ids, strategy):
    with c3a.intercept(strategy):
      return model(ids, params=c3a.combine(adapter, base), train=False).logits

  one = jax.jit(functools.partial(forward, strategy="auto"))
  one_fft = jax.jit(functools.partial(forward, strategy="fft"))

  @jax.jit
  def mixed(stacked, base, ids, index):
    with c3a.intercept(adapter_index=index):
      return model(ids, params=c3a.combine(stacked, base), train=False).logits

  def separate():
    return [one(adapters[j], base, ids[index == j]) for j in range(k) if (index == j).any()]

  runs = {
    "one (auto)": lambda: one(adapters[0], base, ids),
    "one (fft)": lambda: one_fft(adapters[0], base, ids),
    f"mixed ({k} adapters)": lambda: mixed(stacked, base, ids, index),
    f"separate ({k} passes)": separate,
  }
  t = interleaved(runs, args.repeats, warmup=2)
  ref = t["one (auto)"]
  rows = [[name, f"{v * 1e3:.1f}", v / ref] for name, v in t.items()]
  print(
    f"\nForward pass, RoBERTa-base widths, {args.layers} layers, batch {args.batch} x seq "
    f"{args.seq}, C3A block {args.block_size} on query/value (medians of {args.repeats}, "
    "interleaved):\n"
  )
  print(markdown_table(["run", "ms", "/ one (auto)"], rows))
  ratio = t[f"mixed ({k} adapters)"] / ref
  print(f"\nTarget: mixed / one <= 1.2: {ratio:.3f} ({'met' if ratio <= 1.2 else 'NOT met'})")


if __name__ == "__main__":
  main()
