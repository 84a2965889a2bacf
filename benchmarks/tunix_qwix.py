"""Tunix's NNX Qwen 3 at 1024 width: a C3A training step against Qwix's LoRA r=8 step.

Both adapt the same layers (q_proj and v_proj, einsum modules), both train with
``nnx.Optimizer`` (``wrt=c3a.C3AParam`` / ``wrt=nnx.LoRAParam``) inside ``nnx.jit``, where the
model's state is an argument of the jitted function (nothing constant-folded). Timed
interleaved in one run (medians over repeats); the ratio is C3A step / LoRA step (<= 1 meets
the target). The base model is randomly initialised: speed does not depend on the weights.

    python benchmarks/tunix_qwix.py                 # 1024 wide, 2 layers, 4 x 256 tokens
    python benchmarks/tunix_qwix.py --layers 4 --seq 512 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import optax
import qwix
from flax import nnx
from tunix.models.qwen3 import model as qwen3

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved, machine, markdown_table, wait_for_quiet

import c3a_jax as c3a


def qwen3_model(args, dtype=None, **config) -> qwen3.Qwen3:
  """Tunix's Qwen 3 at ``args``' width, depth and vocabulary (random weights), in ``dtype``
  (default ``args.dtype``); ``config``: more ``ModelConfig`` fields."""
  dtype = jnp.dtype(dtype or args.dtype)
  cfg = qwen3.ModelConfig(
    num_layers=args.layers,
    vocab_size=args.vocab,
    embed_dim=args.width,
    hidden_dim=3 * args.width,
    num_heads=16,
    head_dim=args.width // 8,
    num_kv_heads=8,
    rope_theta=1_000_000,
    norm_eps=1e-6,
    dtype=dtype,
    param_dtype=dtype,
    **config,
  )
  return qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))


def inputs(args):
  """Tokens, positions and a causal mask for ``args.batch`` x ``args.seq``."""
  tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, args.vocab)
  positions = jnp.broadcast_to(jnp.arange(args.seq), tokens.shape)
  mask = jnp.broadcast_to(
    jnp.tril(jnp.ones((args.seq, args.seq), bool)), (args.batch, args.seq, args.seq)
  )
  return tokens, positions, mask


def _step(param_type, strategy="auto"):
  @nnx.jit
  def step(model, optimizer, tokens, positions, mask):
    def loss(model):
      with c3a.intercept(strategy):  # picks how NNX layers compute the delta (no-op for LoRA)
        logits = model(tokens, positions, None, mask)[0]
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, param_type))(model)
    optimizer.update(model, grads)
    return value

  return step


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--width", type=int, default=1024)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--vocab", type=int, default=4096)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--block-size", type=int, default=128)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument(
    "--strategies", default="auto,fft", help="C3A's strategies to time (c3a_jax.ops.STRATEGIES)"
  )
  args = p.parse_args()

  tokens, positions, mask = inputs(args)
  base = qwen3_model(args)
  cfg = c3a.C3AConfig(block_size=args.block_size, target_modules=["q_proj", "v_proj"])
  c3a_model = c3a.attach(base, cfg, jax.random.key(2))
  provider = qwix.LoraProvider(
    module_path=".*(q_proj|v_proj)", rank=args.rank, alpha=2.0 * args.rank
  )
  lora_model = qwix.apply_lora_to_model(
    qwen3_model(args), provider, tokens, positions, None, mask, rngs=nnx.Rngs(3)
  )
  runs, counts = {}, {}
  lora_name = f"lora{args.rank}"
  variants = [
    (f"c3a {st}", nnx.clone(c3a_model), c3a.C3AParam, st) for st in args.strategies.split(",")
  ]
  for name, model, param_type, strategy in [
    *variants,
    (lora_name, lora_model, nnx.LoRAParam, "auto"),
  ]:
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=param_type)
    step = _step(param_type, strategy)
    runs[name] = lambda s=step, m=model, o=optimizer: s(m, o, tokens, positions, mask)
    counts[name] = sum(x.size for x in jax.tree.leaves(nnx.state(model, param_type)))
  wait_for_quiet()
  times = interleaved(runs, repeats=args.repeats)
  lora = times[lora_name]
  print(machine())
  print(
    f"Tunix Qwen3, width {args.width}, {args.layers} layers, {args.batch} x {args.seq} tokens, "
    f"{args.dtype}; adapted: q_proj, v_proj (C3A block size {args.block_size})"
  )
  rows = [[n, counts[n], 1e3 * t, t / lora] for n, t in times.items()]
  print(markdown_table(["method", "trainable params", "step ms", "/ LoRA step"], rows))
  best = min((t, n) for n, t in times.items() if n != lora_name)
  print(f"Target: c3a step / {lora_name} step <= 1: {best[0] / lora:.3f} ({best[1]})")


if __name__ == "__main__":
  main()
