"""Model level: one full training step of a RoBERTa-base-shaped encoder, per fine-tuning method.

RoBERTa-base widths (hidden 768, 12 heads, MLP 3072, vocab 50265), 4 layers by default,
sequence 128, batch 8, a 2-label classification head (trained by every method), AdamW.
Methods, timed interleaved in one run (medians over repeats):
  bitfit   biases only (+ head): the floor, no extra compute in the layers;
  c3a      C3A on query/value, block 128 (+ head), strategy "auto" (and the others with --all;
           off CPU, --all also times c3a_jax.experimental.pallas, through an interceptor in
           benchmarks/common.py: it is not a strategy);
  lora8    LoRA r=8 on query/value (+ head), the baseline in benchmarks/common.py;
  full     every weight trains.
For each: step time, tokens/s, and XLA's compiled memory (temp = activations and workspace;
peak = arguments + outputs + temp), and the seconds to lower and compile the step once.

    python benchmarks/model.py               # ~2 minutes on 2 cores
    python benchmarks/model.py --all         # also every C3A strategy (and Pallas off CPU)
    python benchmarks/model.py --layers 12   # the full-depth encoder
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
  attach_lora,
  combine,
  interleaved,
  lora_interceptor,
  machine,
  markdown_table,
  model_parser,
  pallas_interceptor,
  partition,
  roberta_base_config,
  wait_for_quiet,
)

import c3a_jax as c3a


def build_model(layers: int, seq: int):
  from transformers import FlaxRobertaForSequenceClassification, RobertaConfig

  config = RobertaConfig(**roberta_base_config(layers, seq))
  return FlaxRobertaForSequenceClassification(config, seed=0)


def make_step(model, trainable, frozen, context, tx):
  """jit(step)(trainable, opt_state, frozen, ids, labels) -> (trainable, opt_state, loss)."""

  def loss_fn(trainable, frozen, ids, labels):
    with context():
      logits = model(ids, params=combine(trainable, frozen), train=False).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def step(trainable, opt_state, frozen, ids, labels):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids, labels)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  return jax.jit(step)


def methods(model, block_size: int, strategies: tuple[str, ...]):
  """name -> (trainable, frozen, context manager factory).

  ``strategies``: of ``c3a.ops.STRATEGIES``, or "pallas" for the experimental Pallas kernel.
  """
  import contextlib

  import flax.linen as nn

  params = model.params
  head = lambda path: path[0] == "classifier"
  out = {}
  out["bitfit"] = (*partition(params, lambda p: head(p) or p[-1] == "bias"), contextlib.nullcontext)
  cfg = c3a.C3AConfig(
    block_size=block_size,
    target_modules=["query", "value"],
    modules_to_save=["classifier"],
    task_type="SEQ_CLS",
  )
  c3a_params = c3a.attach(params, cfg, jax.random.key(1), model_type="roberta")
  adapter, base = c3a.split(c3a_params, cfg)
  for s in strategies:
    name = "c3a" if s == "auto" else f"c3a[{s}]"
    context = (
      (lambda: nn.intercept_methods(pallas_interceptor()))
      if s == "pallas"
      else lambda s=s: c3a.intercept(strategy=s)
    )
    out[name] = (adapter, base, context)
  lora = attach_lora(params, ("query", "value"), 8, jax.random.key(2))
  out["lora8"] = (
    *partition(lora, lambda p: head(p) or p[-1] in ("lora_a", "lora_b")),
    lambda: nn.intercept_methods(lora_interceptor(16 / 8)),
  )
  out["full"] = (params, {}, contextlib.nullcontext)
  return out


def setup(args):
  """Waits for a quiet machine, names it, and builds the model and a batch."""
  load = wait_for_quiet()
  print(f"# machine: {machine()}\n# load when measuring: {load:.2f}", flush=True)
  model = build_model(args.layers, args.seq)
  ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 3, 50265)
  return model, ids, jnp.arange(args.batch) % 2


def main():
  p = model_parser(__doc__.splitlines()[0], repeats=10)
  p.add_argument("--all", action="store_true", help="time every C3A strategy")
  args = p.parse_args()
  model, ids, labels = setup(args)
  # The experimental Pallas kernel runs in interpret mode on CPU (a test path, far too slow to
  # time): GPU/TPU only.
  strategies = (
    (
      "auto",
      "fft",
      "freq_major",
      "dense",
      "fold",
      *(("pallas",) if jax.default_backend() != "cpu" else ()),
    )
    if args.all
    else ("auto", "fft")
  )
  tx = optax.adamw(1e-3)
  fns, memory, compile_s = {}, {}, {}
  for name, (trainable, frozen, context) in methods(model, args.block_size, strategies).items():
    step = make_step(model, trainable, frozen, context, tx)
    opt_state = tx.init(trainable)
    start = time.perf_counter()  # lowering and compiling, once, as the first call would
    memory[name] = c3a.training.compiled_memory(step, trainable, opt_state, frozen, ids, labels)
    compile_s[name] = time.perf_counter() - start
    fns[name] = (lambda step, t, o, f: lambda: step(t, o, f, ids, labels))(
      step, trainable, opt_state, frozen
    )
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    memory[name]["trainable"] = n_train
    print(f"# compiled {name}: {n_train:,} trainable", flush=True)
  t = interleaved(fns, args.repeats, warmup=2)
  tokens = args.batch * args.seq
  mib = lambda b: f"{b / 2**20:.1f}"
  rows = [
    [
      name,
      f"{memory[name]['trainable']:,}",
      f"{t[name] * 1e3:.1f}",
      f"{tokens / t[name]:.0f}",
      t[name] / t["bitfit"],
      t[name] / t["lora8"],
      mib(memory[name]["temp"]),
      mib(memory[name]["peak"]),
      memory[name]["temp"] / memory["lora8"]["temp"],
      memory[name]["peak"] / memory["lora8"]["peak"],
      f"{compile_s[name]:.1f}",
    ]
    for name in fns
  ]
  print(
    f"\nTraining step, RoBERTa-base widths, {args.layers} layers, batch {args.batch} x seq "
    f"{args.seq}, C3A block {args.block_size} (medians of {args.repeats}, interleaved):\n"
  )
  print(
    markdown_table(
      [
        "method",
        "trainable",
        "step ms",
        "tokens/s",
        "/ bitfit",
        "/ lora8",
        "temp MiB",
        "peak MiB",
        "temp / lora8",
        "peak / lora8",
        "compile s",
      ],
      rows,
    )
  )
  c, bf, lo = t["c3a"], t["bitfit"], t["lora8"]
  print(
    f"\nTargets: c3a/bitfit = {c / bf:.3f} "
    f"(<= 1.05: {'met' if c / bf <= 1.05 else 'NOT met'}); "
    f"c3a/lora8 = {c / lo:.3f} (<= 1.02: {'met' if c / lo <= 1.02 else 'NOT met'}); "
    f"compiled peak c3a/lora8 = {memory['c3a']['peak'] / memory['lora8']['peak']:.3f}, "
    f"temp = {memory['c3a']['temp'] / memory['lora8']['temp']:.3f} (<= 1: "
    f"{'met' if memory['c3a']['peak'] <= memory['lora8']['peak'] else 'NOT met'}); "
    f"compile c3a/lora8 = {compile_s['c3a'] / compile_s['lora8']:.2f} (<= 1.5: "
    f"{'met' if compile_s['c3a'] <= 1.5 * compile_s['lora8'] else 'NOT met'})"
  )


if __name__ == "__main__":
  main()
