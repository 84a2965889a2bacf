"""Plots layer.py's JSON: adapter fwd+bwd time / frozen matmul fwd+bwd, per strategy and shape.

python benchmarks/layer.py --json benchmarks/layer.json
python benchmarks/plot.py benchmarks/layer.json benchmarks/layer.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(src: str, dst: str) -> None:
  with open(src) as f:
    data = json.load(f)
  rows = data["rows"]
  # Whichever of these every row has: "rfft" and "dft" are in files recorded with 0.1 (strategies
  # removed in 0.2), "pallas" (the experimental kernel) in files recorded off CPU.
  series = [
    s
    for s in (
      "in_dense",
      "fft",
      "rfft",
      "dft",
      "freq_major",
      "dense",
      "pallas",
      "lora8",
      "lora_same",
    )
    if all(s in r["seconds"] for r in rows)
  ]
  names = {
    "in_dense": "C3A in a float32 Dense (auto)",
    "lora8": "LoRA r=8",
    "lora_same": "LoRA same params",
    "rfft": "delta alone, rfft (0.1)",
    "dft": "delta alone, dft (0.1)",
    "pallas": "delta alone, c3a_jax.experimental.pallas",
  }
  labels = [f"{r['shape'][0]}x{r['shape'][1]}\nT={r['tokens']} b={r['b']}" for r in rows]
  fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(rows)), 4.5))
  width = 0.8 / len(series)
  for k, s in enumerate(series):
    # The in-Dense time includes the frozen matmul; the others are the adapter alone. Newer
    # files hold the table's own figures ("cost"); older ones median seconds only.
    ratios = [
      r["cost"][s] if "cost" in r else r["seconds"][s] / r["seconds"]["frozen"] - (s == "in_dense")
      for r in rows
    ]
    ax.bar(
      [i + (k - len(series) / 2) * width for i in range(len(rows))],
      ratios,
      width,
      label=names.get(s, f"delta alone, {s}"),
    )
  ax.axhline(1.0, color="k", lw=0.8, ls="--")
  ax.set_xticks(range(len(rows)), labels, fontsize=7)
  ax.set_yscale("log")
  ax.set_ylabel("adapter's fwd+bwd cost / frozen matmul fwd+bwd")
  ax.set_title(f"C3A cost by strategy ({data['machine'][:60]}...)", fontsize=8)
  ax.legend(fontsize=7, ncol=4)
  fig.tight_layout()
  fig.savefig(dst, dpi=120)
  print(f"wrote {dst}")


if __name__ == "__main__":
  main(*(sys.argv[1:3] if len(sys.argv) > 2 else ("benchmarks/layer.json", "benchmarks/layer.png")))
