"""Against PEFT: the same C3A training step in c3a-jax and in PyTorch PEFT, on the same CPU.

RoBERTa-base widths (4 layers by default), batch 8 x seq 128, C3A block 128 on query/value plus
the classification head, AdamW, dropout off in both. Steps alternate between the two
frameworks (medians over repeats); both use every core. Bias-only training (BitFit) in each
framework is timed too: the step with a free adapter, which bounds any C3A speed-up.

    python benchmarks/peft_compare.py          # ~2 minutes on 2 cores
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import jax
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, model_parser, roberta_base_config
from model import make_step, methods, setup


def torch_step_fn(layers: int, seq: int, batch: int, block: int, adapter: bool = True):
  """A PEFT C3A training step; ``adapter=False``: biases and head only (BitFit)."""
  import peft
  import torch
  from transformers import RobertaConfig, RobertaForSequenceClassification

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  config = RobertaConfig(
    **roberta_base_config(layers, seq),
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
  )
  model = RobertaForSequenceClassification(config)
  if adapter:
    model = peft.get_peft_model(
      model,
      peft.C3AConfig(block_size=block, target_modules=["query", "value"], task_type="SEQ_CLS"),
    )
  else:
    for name, param in model.named_parameters():
      param.requires_grad = name.startswith("classifier") or name.endswith("bias")
  model.train()
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
  ids = torch.randint(3, 50265, (batch, seq))
  labels = torch.arange(batch) % 2

  def step():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits, labels)
    loss.backward()
    opt.step()
    return loss.item()

  return step, f"torch {torch.__version__}, peft {peft.__version__}"


def main():
  p = model_parser(__doc__.splitlines()[0], repeats=8)
  args = p.parse_args()
  model, ids, labels = setup(args)
  tx = optax.adamw(1e-3)
  fns = {}
  for name, (trainable, frozen, context) in methods(
    model, args.block_size, ("auto", "fft")
  ).items():
    if not name.startswith(("c3a", "bitfit")):
      continue
    step = make_step(model, trainable, frozen, context, tx)
    opt_state = tx.init(trainable)
    fns[f"c3a-jax {name}"] = (
      lambda step, t, o, f: lambda: jax.block_until_ready(step(t, o, f, ids, labels))
    )(step, trainable, opt_state, frozen)
  torch_step, versions = torch_step_fn(args.layers, args.seq, args.batch, args.block_size)
  fns["PEFT"] = torch_step
  fns["PyTorch bitfit"] = torch_step_fn(
    args.layers, args.seq, args.batch, args.block_size, adapter=False
  )[0]
  print(f"# {versions}", flush=True)
  for fn in fns.values():
    fn(), fn()
  times = {k: [] for k in fns}
  for _ in range(args.repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  t = {k: statistics.median(v) for k, v in times.items()}
  tokens = args.batch * args.seq
  rows = [[k, f"{v * 1e3:.1f}", f"{tokens / v:.0f}", t["PEFT"] / v] for k, v in t.items()]
  print(
    f"\nC3A training step, RoBERTa-base widths, {args.layers} layers, batch {args.batch} x "
    f"seq {args.seq}, block {args.block_size} (medians of {args.repeats}, alternating):\n"
  )
  print(markdown_table(["implementation", "step ms", "tokens/s", "speed-up vs PEFT"], rows))
  s = t["PEFT"] / t["c3a-jax c3a"]
  print(
    f"\nTarget: c3a-jax >= 2.5x PEFT: {s:.2f}x ({'met' if s >= 2.5 else 'NOT met'}). "
    f"Frozen-model floor: c3a-jax bitfit is {t['PyTorch bitfit'] / t['c3a-jax bitfit']:.2f}x "
    f"PyTorch's; PEFT's C3A costs {t['PEFT'] / t['PyTorch bitfit']:.2f}x PyTorch bitfit, "
    f"c3a-jax's {t['c3a-jax c3a'] / t['c3a-jax bitfit']:.2f}x its bitfit"
  )


if __name__ == "__main__":
  main()
