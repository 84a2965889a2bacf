"""The benchmark scripts run and print their tables (at toy sizes; the numbers are not checked:
speed is measured by the scripts themselves, never asserted in tests)."""

import os
import subprocess
import sys

import pytest

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


def test_mixed_adapters_benchmark():
  out = run("mixed.py", *TINY, "--adapters", "2")
  assert "| mixed (2 adapters) |" in out and "Target: mixed / one" in out
