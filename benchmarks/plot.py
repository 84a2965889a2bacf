"""Plots layer.py's JSON: adapter fwd+bwd time / frozen matmul fwd+bwd, per strategy and shape.

    python benchmarks/layer.py --json benchmarks/layer.json
    python benchmarks/plot.py benchmarks/layer.json benchmarks/layer.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
  with open(src) as f:
    data = json.load(f)
  rows = data["rows"]
  series = ["fft", "rfft", "dft", "dense", "auto", "lora8", "lora_same"]
  labels = [f"{r['shape'][0]}x{r['shape'][1]}\nT={r['tokens']} b={r['b']}" for r in rows]
  fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(rows)), 4.5))
  width = 0.8 / len(series)
  for k, s in enumerate(series):
    ratios = [r["seconds"][s] / r["seconds"]["frozen"] for r in rows]
    ax.bar([i + (k - len(series) / 2) * width for i in range(len(rows))], ratios, width,
           label=s if s not in ("lora8", "lora_same") else
           {"lora8": "LoRA r=8", "lora_same": "LoRA same params"}[s])
  ax.axhline(1.0, color="k", lw=0.8, ls="--")
  ax.set_xticks(range(len(rows)), labels, fontsize=7)
  ax.set_yscale("log")
  ax.set_ylabel("adapter fwd+bwd / frozen matmul fwd+bwd")
  ax.set_title(f"C3A delta cost by strategy ({data['machine'][:60]}...)", fontsize=8)
  ax.legend(fontsize=7, ncol=4)
  fig.tight_layout()
  fig.savefig(dst, dpi=120)
  print(f"wrote {dst}")


if __name__ == "__main__":
  main(*(sys.argv[1:3] if len(sys.argv) > 2 else ("benchmarks/layer.json",
                                                    "benchmarks/layer.png")))
