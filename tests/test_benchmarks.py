"""The benchmark scripts run and print their tables (at toy sizes; the numbers are not checked:
speed is measured by the scripts themselves, never asserted in tests)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from c3a_jax import ops

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--layers", "1", "--seq", "16", "--batch", "2", "--repeats", "1"]


def run(script, *args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["BENCH_WAIT_TRIES"] = "0"  # do not wait for a quiet machine
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_model_benchmark():
  out = run("model.py", *TINY)
  for method in ("| bitfit |", "| c3a |", "| lora8 |", "| full |"):
    assert method in out
  assert "Targets: c3a/bitfit" in out


def test_peft_benchmark():
  pytest.importorskip("torch")
  pytest.importorskip("peft")
  out = run("peft_compare.py", *TINY)
  assert "| PEFT |" in out and "speed-up vs PEFT" in out


def test_layer_benchmark():
  out = run("layer.py", "--quick", "--repeats", "1")
  assert "768x768" in out and "4096x4096" in out


def test_tunix_qwix_benchmark():
  pytest.importorskip("tunix.models.qwen3.model")
  out = run(
    "tunix_qwix.py",
    "--width",
    "64",
    "--layers",
    "1",
    "--seq",
    "16",
    "--vocab",
    "64",
    "--block-size",
    "8",
    "--repeats",
    "1",
  )
  assert "| c3a auto |" in out and "| lora8 |" in out and "Target: c3a step" in out


def test_quantized_base_benchmark():
  pytest.importorskip("qwix")
  pytest.importorskip("tunix.models.qwen3.model")
  out = run("quantized.py", "--quick", "--repeats", "1", "--weights", "bf16,int8")
  assert "| int8 |" in out and "Target: C3A step / QLoRA step over int8" in out


def test_mixed_adapters_benchmark():
  out = run("mixed.py", *TINY, "--adapters", "2")
  assert "| mixed (2 adapters) |" in out and "Target: mixed / one" in out


def test_accelerator_benchmark(tmp_path):
  """benchmarks/accelerator.py at toy sizes on CPU writes both files with every row and key (the
  figures are not checked); PEFT on torch's CPU where torch and peft are installed."""
  peft = all(importlib.util.find_spec(m) for m in ("torch", "peft"))
  args = ["--toy", "--no-tests", "--out", str(tmp_path)]
  out = run("accelerator.py", *args, *(["--torch-device", "cpu"] if peft else []))
  assert sorted(os.listdir(tmp_path)) == ["accelerator.json", "accelerator.md"]  # no temp files
  data = json.loads((tmp_path / "accelerator.json").read_text())
  keys = {"machine", "method", "settings", "ceilings", "layers", "precision", "tests"}
  assert keys | {"peft_torch", "targets", "skipped", "seconds"} <= data.keys()
  assert data["machine"]["device_kind"] and data["machine"]["jax"] and data["machine"]["flax"]
  assert {"tflops", "ms"} <= data["ceilings"]["bf16_matmul"].keys()
  assert {"TBps", "bytes"} <= data["ceilings"]["copy"].keys()
  layers = [(64, 64, 16), (64, 128, 16)]
  rows = {(r["dtype"], r["d_in"], r["d_out"], r["b"]): r for r in data["layers"]}
  assert set(rows) == {(d, *shape) for d in ("bfloat16", "float32") for shape in layers}
  c3a = {f"c3a_{s}" for s in ops.STRATEGIES}
  for (dtype, *_), row in rows.items():
    assert row["errors"] == {} and row["tokens"] == 256
    assert set(row["ms"]) == {"frozen", "lora16", *c3a}  # no Pallas on CPU unless --pallas
    assert set(row["extra"]) == {"lora16", *c3a}
    assert row["auto_picks"] in ops.STRATEGIES and row["fastest"] in ops.STRATEGIES
    assert {"auto_vs_fastest", "auto_within_10pct", "noise", "floor_extra"} <= row.keys()
    if dtype == "float32":
      assert set(row["in_layer_relerr"]) == set(ops.STRATEGIES)
  assert [(p["d_in"], p["d_out"], p["b"]) for p in data["precision"]] == layers
  assert all(set(p["relerr"]) == set(ops.STRATEGIES) for p in data["precision"])
  assert data["tests"] == {"skipped": "--no-tests"}
  if peft:
    assert [r["extra"].keys() for r in data["peft_torch"]["rows"]] == [{"c3a", "lora"}] * 2
  assert len(data["targets"]) == 5 and all(t["verdict"] for t in data["targets"])
  md = (tmp_path / "accelerator.md").read_text()
  for part in ("## Ceilings", "## bfloat16, 256 tokens", "## float32, 256 tokens", "## Targets"):
    assert part in md and part in out
  assert md.count("| 64x128 | 16 |") == 3 + peft  # bf16, float32, precision (, PEFT)
  assert "auto within 10% of the fastest strategy" in md


def test_accelerator_reads_pytest_summaries():
  """The test tier's counts and failing ids come from pytest's closing and -rfE lines."""
  code = (
    "import sys; sys.path.insert(0, 'benchmarks'); import accelerator, json; "
    "print(json.dumps(accelerator.parse_pytest(sys.stdin.read())))"
  )
  summary = (
    "..F.\n=== short test summary info ===\n"
    "FAILED tests/test_ops.py::test_a[jit-3-2-5] - AssertionError: x - y\n"
    "ERROR tests/test_nnx.py::test_b\n"
    "1 failed, 3 passed, 2 skipped, 1 error, 4 warnings in 12.34s\n"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code], input=summary, cwd=ROOT, capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  got = json.loads(proc.stdout)
  assert got["counts"] == {"failed": 1, "passed": 3, "skipped": 2, "errors": 1, "warnings": 4}
  assert got["failed"] == [
    "FAILED tests/test_ops.py::test_a[jit-3-2-5]",
    "ERROR tests/test_nnx.py::test_b",
  ]


def test_timed_functions_return_the_cotangents_dtype():
  """common.fwd_bwd casts y to g's dtype: a bf16 layer's float32 path (ops.fold returns
  float32) took a bf16 cotangent off CPU and crashed layer.py --dtype bfloat16 on a GPU."""
  code = (
    "import sys; sys.path.insert(0, 'benchmarks'); import common, jax.numpy as jnp; "
    "from c3a_jax import ops; f = common.fwd_bwd(lambda x, w: ops.fold(x, w), argnums=(0, 1)); "
    "y, (dx, dw) = f(jnp.ones((4, 8), jnp.bfloat16), jnp.ones((3, 2, 4)), "
    "jnp.ones((4, 12), jnp.bfloat16)); print(y.dtype, dx.dtype, dw.dtype)"
  )
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["bfloat16", "bfloat16", "float32"]
