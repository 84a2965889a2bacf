"""C3A over a quantized frozen base (QC3A): Tunix's NNX Qwen 3 with bf16, int8, int4, nf4 weights.

The base is Tunix's Qwen 3 in bfloat16 (width 1024, 16 heads of 128, 8 KV heads, MLP 3072, 4
layers, vocabulary 4096 by default), randomly initialised here: the MLP kernels, which Tunix
initialises to zero, are drawn N(0, 1/fan_in) so that quantizing them costs what it would. For
each base, the weights of q/k/v/o_proj and of the MLP's gate/up/down_proj are stored by Qwix's
PTQ (``c3a.quantize.quantize_nnx``; "bf16" leaves them as they are), then:

  (a) the compiled memory of the C3A training step (``memory_analysis()`` of the jitted step:
      peak = arguments + outputs + temp), and its peak over the bf16 base's;
  (b) the step time of C3A (on q_proj, v_proj) against Qwix's QLoRA r=16 (alpha 32) on the
      same base and the same layers (``qwix.apply_lora_to_model`` with a ``LoraProvider``
      whose rules quantize the same weights), timed interleaved in one run (medians; the
      ratio is the median over rounds of C3A / QLoRA in the same round);
  (c) the logits of the adapted model over the quantized base against the same adapter over
      the bf16 base (the same nonzero C3A kernels: ``c3a.attach`` with one key): max |diff|
      and the relative L2 difference; beside it, how far the adapter moves the logits of
      its base (the same model with its C3A kernels zeroed), which shows that the delta is
      applied over Qwix's products.

Every step trains with ``nnx.Optimizer(adamw)`` (``wrt=c3a.C3AParam`` / ``nnx.LoRAParam``)
inside ``jax.jit``; the model's state and the optimizer's are arguments of the jitted
function (nothing is closed over, so XLA folds no weight into a constant).

    python benchmarks/quantized.py --quick                     # tiny shapes, < 1 minute
    python benchmarks/quantized.py --out /tmp/quantized        # also writes quantized.json
    python benchmarks/quantized.py --weights bf16,int4 --tile-size 64 --seq 128
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import zlib

import jax
import jax.numpy as jnp
import optax
import qwix
from flax import nnx
from tunix.models.qwen3 import model as qwen3

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, machine_info, markdown_table, rounds, wait_for_quiet
from tunix_qwix import inputs as make_inputs
from tunix_qwix import qwen3_model

import c3a_jax as c3a

BASES = ("bf16", "int8", "int4", "nf4")
QUANTIZED = ".*/(attn/(q_proj|k_proj|v_proj|o_proj)|mlp/(gate_proj|up_proj|down_proj))"
"""Qwix module paths (e.g. ``layers/0/attn/q_proj``) of the weights a quantized base stores."""
MiB = 2**20


def _model(args) -> qwen3.Qwen3:
  """The bf16 base, its weights drawn from fixed keys (the same for every call)."""
  model = qwen3_model(args, jnp.bfloat16, remat_config=qwen3.RematConfig[args.remat.upper()])
  for path, module in nnx.iter_graph(model):
    if isinstance(module, nnx.Linear):  # the MLP: Tunix initialises it to zeros
      key = jax.random.fold_in(jax.random.key(5), zlib.crc32("/".join(map(str, path)).encode()))
      kernel = module.kernel.get_value()
      w = jax.random.normal(key, kernel.shape, jnp.float32) / kernel.shape[0] ** 0.5
      module.kernel.set_value(w.astype(kernel.dtype))
  return model


def _c3a_model(args, weights: str, inputs) -> nnx.Module:
  """The base, quantized by Qwix unless bf16, with C3A attached (the same kernels for every
  base: one key, each layer's kernel drawn from it folded with the layer's path)."""
  model = _model(args)
  tokens, positions, mask = inputs
  if weights != "bf16":
    model = c3a.quantize.quantize_nnx(
      model,
      tokens,
      positions,
      None,
      mask,
      weights=weights,
      tile_size=args.tile_size,
      module_path=QUANTIZED,
    )
  cfg = c3a.C3AConfig(block_size=args.block_size, target_modules=args.targets.split(","))
  return c3a.attach(model, cfg, jax.random.key(2))


def _qlora_model(args, weights: str, inputs) -> nnx.Module:
  """Qwix's (Q)LoRA r=``args.rank`` on the same layers, over the same quantized weights."""

  class QLoraProvider(c3a.quantize.TunixCasts, qwix.LoraProvider):
    pass

  qtype = None if weights == "bf16" else weights
  adapted = f".*/({args.targets.replace(',', '|')})"
  rules = [
    qwix.LoraRule(
      module_path=adapted,
      rank=args.rank,
      alpha=2.0 * args.rank,
      weight_qtype=qtype,
      tile_size=args.tile_size,
    )
  ]
  if qtype is not None:  # the other quantized weights: PTQ alone
    rules.append(
      qwix.QuantizationRule(module_path=QUANTIZED, weight_qtype=qtype, tile_size=args.tile_size)
    )
  tokens, positions, mask = inputs
  return qwix.apply_lora_to_model(
    _model(args), QLoraProvider(rules), tokens, positions, None, mask, rngs=nnx.Rngs(3)
  )


def _train_step(model: nnx.Module, param_type, strategy: str):
  """(jitted step, its arguments but the inputs): the trainable state, the rest of the model
  (frozen, quantized or not) and the optimizer's state are all arguments."""
  graphdef, params, frozen = nnx.split(model, param_type, ...)
  optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=param_type)
  opt_def, opt_state = nnx.split(optimizer)

  @jax.jit
  def step(params, frozen, opt_state, tokens, positions, mask):
    model = nnx.merge(graphdef, params, frozen)
    optimizer = nnx.merge(opt_def, opt_state)

    def loss(model):
      with c3a.intercept(strategy):  # no-op for Qwix's LoRA
        logits = model(tokens, positions, None, mask)[0]
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, param_type))(model)
    optimizer.update(model, grads)
    return value, nnx.state(model, param_type), nnx.state(optimizer)

  return step, (params, frozen, opt_state)


def _logits(model: nnx.Module, strategy: str, inputs) -> tuple[jax.Array, jax.Array]:
  """The model's logits, and those of the same model with its C3A kernels zeroed."""
  graphdef, kernels, rest = nnx.split(model, c3a.C3AParam, ...)

  @jax.jit
  def forward(kernels, rest, tokens, positions, mask):
    with c3a.intercept(strategy):
      return nnx.merge(graphdef, kernels, rest)(tokens, positions, None, mask)[0]

  zeros = jax.tree.map(jnp.zeros_like, kernels)
  return forward(kernels, rest, *inputs), forward(zeros, rest, *inputs)


def _diff(y: jax.Array, ref: jax.Array) -> tuple[float, float]:
  """(max |y - ref|, ||y - ref|| / ||ref||), in float32."""
  d = (y - ref).astype(jnp.float32)
  return float(jnp.abs(d).max()), float(jnp.linalg.norm(d) / jnp.linalg.norm(ref))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--width", type=int, default=1024)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--vocab", type=int, default=4096)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--block-size", type=int, default=256)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--targets", default="q_proj,v_proj", help="the layers C3A and QLoRA adapt")
  p.add_argument("--strategy", default="auto", help="C3A's strategy (c3a_jax.ops.STRATEGIES)")
  p.add_argument("--weights", default=",".join(BASES), help=f"bases, a subset of {BASES}")
  p.add_argument(
    "--tile-size", type=int, default=None, help="Qwix's sub-channel tile (default: per channel)"
  )
  p.add_argument(
    "--remat",
    default="none",
    choices=["none", "block", "decoder"],
    help="Tunix's rematerialisation (RematConfig): none, each block, each decoder layer",
  )
  p.add_argument("--repeats", type=int, default=5, help="0: memory and logits only, no timing")
  p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test (< 1 minute)")
  p.add_argument("--out", help="a folder to write quantized.json into")
  args = p.parse_args()
  if args.quick:
    args.width, args.layers, args.vocab, args.batch, args.seq = 128, 1, 256, 2, 32
    args.block_size, args.repeats = 16, 2
    args.tile_size = args.tile_size and min(args.tile_size, 16)
  bases = args.weights.split(",")
  if "bf16" not in bases:
    bases.insert(0, "bf16")  # the reference of the memory ratios and logit differences
  unknown = set(bases) - set(BASES)
  if unknown:
    p.error(f"--weights: {sorted(unknown)} not in {BASES}")

  inputs = make_inputs(args)
  runs, memory, counts, logits, shift = {}, {}, {}, {}, {}
  ref_kernels = None
  for weights in bases:
    model = _c3a_model(args, weights, inputs)
    kernels = jax.tree.leaves(nnx.state(model, c3a.C3AParam))
    if ref_kernels is None:
      ref_kernels = kernels
      assert all(float(jnp.abs(k).max()) > 0 for k in kernels), "C3A kernels are zero"
    else:  # the same adapter over every base
      assert all(bool((a == b).all()) for a, b in zip(kernels, ref_kernels, strict=True))
    logits[weights], plain = _logits(model, args.strategy, inputs)
    shift[weights] = _diff(logits[weights], plain)[1]
    for method, m, param_type, strategy in [
      ("c3a", model, c3a.C3AParam, args.strategy),
      (f"qlora{args.rank}", _qlora_model(args, weights, inputs), nnx.LoRAParam, "auto"),
    ]:
      name = f"{method} {weights}"
      step, state = _train_step(m, param_type, strategy)
      call = (*state, *inputs)
      memory[name] = c3a.training.compiled_memory(step, *call)  # bytes
      counts[name] = sum(x.size for x in jax.tree.leaves(nnx.state(m, param_type)))
      runs[name] = lambda s=step, a=call: s(*a)
      print(f"# built {name}: peak {memory[name]['peak'] / MiB:.1f} MiB", flush=True)
    del model

  load = wait_for_quiet() if args.repeats else os.getloadavg()[0]
  times = rounds(runs, repeats=args.repeats) if args.repeats else {k: [math.nan] for k in runs}
  ref_peak = memory["c3a bf16"]["peak"]
  rows, raw = [], []
  for weights in bases:
    c, q = f"c3a {weights}", f"qlora{args.rank} {weights}"
    ratio = statistics.median(a / b for a, b in zip(times[c], times[q], strict=True))
    max_abs, rel = _diff(logits[weights], logits["bf16"])
    rec = {
      "base": weights,
      "c3a_trainable": counts[c],
      "qlora_trainable": counts[q],
      "c3a_memory": memory[c],
      "qlora_memory": memory[q],
      "c3a_peak_over_bf16": memory[c]["peak"] / ref_peak,
      "c3a_step_s": statistics.median(times[c]),
      "qlora_step_s": statistics.median(times[q]),
      "c3a_step_s_all": times[c],
      "qlora_step_s_all": times[q],
      "c3a_over_qlora": ratio,
      "logits_max_abs_diff": max_abs,
      "logits_rel_diff": rel,
      "adapter_shift_rel": shift[weights],
    }
    raw.append(rec)
    rows.append(
      [
        weights,
        memory[c]["argument"] / MiB,
        memory[c]["argument"] / memory["c3a bf16"]["argument"],
        memory[c]["temp"] / MiB,
        memory[c]["peak"] / MiB,
        rec["c3a_peak_over_bf16"],
        memory[q]["peak"] / MiB,
        1e3 * rec["c3a_step_s"],
        1e3 * rec["qlora_step_s"],
        ratio,
        f"{max_abs:.3g}",
        f"{rel:.3g}",
        f"{shift[weights]:.3g}",
      ]
    )
  header = [
    "base",
    "C3A args MiB",
    "args / bf16's",
    "C3A temp MiB",
    "C3A peak MiB",
    "peak / bf16's",
    f"QLoRA r={args.rank} peak MiB",
    "C3A step ms",
    f"QLoRA r={args.rank} step ms",
    "C3A / QLoRA",
    "logits max abs diff vs bf16",
    "logits rel diff vs bf16",
    "adapter's shift (rel)",
  ]
  tile = "per channel" if args.tile_size is None else f"tile {args.tile_size}"
  print(f"# machine: {machine()}\n# load when measuring: {load:.2f}")
  print(
    f"Tunix Qwen3 (bf16), width {args.width}, {args.layers} layers, vocab {args.vocab}, "
    f"{args.batch} x {args.seq} tokens, remat {args.remat}; "
    f"quantized: q/k/v/o_proj, gate/up/down_proj ({tile}); "
    f"adapted: {args.targets} (C3A block {args.block_size}, {counts['c3a bf16']:,} params, "
    f"strategy {args.strategy!r}; QLoRA r={args.rank}, {counts[f'qlora{args.rank} bf16']:,} "
    f"params); medians of {args.repeats}"
  )
  print(markdown_table(header, rows))
  by = {r["base"]: r for r in raw}
  four = [by[w]["c3a_peak_over_bf16"] for w in ("int4", "nf4") if w in by]
  if four:
    print(f"Target: C3A peak with an int4/nf4 base <= 0.45x bf16's: {max(four):.3f}")
  if "int8" in by and args.repeats:
    print(f"Target: C3A step / QLoRA step over int8 <= 1.05: {by['int8']['c3a_over_qlora']:.3f}")
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "quantized.json")
    with open(path, "w") as f:
      json.dump({"machine": machine_info(), "args": vars(args), "rows": raw}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
