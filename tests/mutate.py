"""Mutation check: does the test suite notice when C3A's math or plumbing is broken on purpose?

Each mutation below replaces one exact line of a file under ``c3a_jax/`` (matched with its
indentation stripped; it must occur exactly once, else the mutation is reported stale, the
others still run and the script exits 2) and names the narrowest tests that must fail
because of it. For each, the script copies the package into a temporary directory, edits the
copy, and runs
``python -m pytest -q -x -p no:cacheprovider -p no:xdist <tests>`` from the repository root
(the default tier: ``-m "not integration"``). A small pytest plugin written beside the copy
puts it first for ``import c3a_jax`` (neither PYTHONPATH nor the editable install would: pytest
puts the repository root first on ``sys.path``) and records which file was imported; a first
run with an import-breaking edit confirms the copy is what the tests see, and a baseline run
of the unedited copy confirms the selected tests pass before any edit. The repository itself
is never written to.

    python tests/mutate.py                 # every mutation, then a table; exit 1 if any survived
    python tests/mutate.py --only NAME     # one (repeatable); --list shows them all
    python tests/mutate.py --no-baseline   # skip the unedited run of the selected tests

Not collected by pytest (no ``test_`` prefix). A mutation that survives is behaviour no test
checks (``fold_decision_inverted`` changes speed, not values: tests/test_layer_paths.py catches
it by counting calls of ``ops.fold``). About 4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "c3a_jax"


@dataclasses.dataclass(frozen=True)
class Mutation:
  """``line`` (stripped) of ``c3a_jax/<file>`` replaced by ``new`` (the indentation kept)."""

  name: str
  file: str
  line: str
  new: str
  tests: tuple[str, ...]


LAYER_PATHS = "tests/test_layer_paths.py"
LINEN_PATHS = LAYER_PATHS + "::test_linen_layers_fold_and_add_with_their_bias"
NNX_PATHS = LAYER_PATHS + "::test_nnx_layers_fold_and_add_with_their_bias"
FORWARD = "tests/test_strategies.py::test_forward_matches_dense_reference"
NNX_LAYERS = "tests/test_nnx.py::test_nnx_layers_equal_the_reference"
FLAT = "return jnp.transpose(kernel, self.perm).reshape(self.d_in, self.d_out)"
VIEW_READ = "value = _merge_record.carry(value, jnp.transpose(value, perm))"
VIEW_WRITE = "value = _merge_record.carry(value, jnp.transpose(value, np.argsort(perm)))"
DELTA_WEIGHT = "return blocks.transpose(1, 3, 0, 2).reshape(n * b, m * b) / (n * b)"
FFT_SPECTRUM = "return jnp.conj(jnp.fft.rfft(w.astype(dtype), axis=-1)) / (n * b)"
SPECTRAL = "irfft_weights(b) / (b * n * b), jnp.float32"
DELTA_ADDED = "return y + _qwix.outside(_delta)(call, y.dtype, strategy, index)"
FOLD_IF = 'if strategy == "fold" and foldable:'
TO_TORCH = 'return "weight", value.transpose(nd - 1, nd - 2, *range(nd - 2))'

MUTATIONS = (
  # 1. The folded path adds the layer's bias itself.
  Mutation(
    "fold_bias_dropped",
    "_layer_call.py",
    "y += jnp.reshape(bias, c.bias_shape())",
    "pass",
    (LAYER_PATHS,),
  ),
  # 2. The operands the fold reads: linen's and NNX's bias.
  Mutation(
    "linen_operands_no_bias",
    "_intercept.py",
    'bias = unbox(module.get_variable("params", "bias")) if module.use_bias else None',
    "bias = None",
    (LINEN_PATHS,),
  ),
  Mutation(
    "nnx_operands_no_bias",
    "_nnx.py",
    'bias = layer.bias[...] if getattr(layer, "bias", None) is not None else None',
    "bias = None",
    (NNX_PATHS,),
  ),
  # 3. PEFT's 1/d_in scale. It is applied in three places; the strategies that reach each
  # (ops/_fold.py, _mixed.py, _freq_major.py, _kernel_grad.py and experimental/pallas.py have
  # no scale of their own) each get a run with their own tests.
  Mutation(
    "scale_delta_weight",  # "dense", and the fold's forward
    "ops/_kernel.py",
    DELTA_WEIGHT,
    "return blocks.transpose(1, 3, 0, 2).reshape(n * b, m * b)",
    (FORWARD,),
  ),
  Mutation(
    "scale_delta_weight_fold",
    "ops/_kernel.py",
    DELTA_WEIGHT,
    "return blocks.transpose(1, 3, 0, 2).reshape(n * b, m * b)",
    (LINEN_PATHS,),
  ),
  Mutation(
    "scale_fft_spectrum",  # "fft"
    "ops/_fft.py",
    FFT_SPECTRUM,
    "return jnp.conj(jnp.fft.rfft(w.astype(dtype), axis=-1))",
    (FORWARD,),
  ),
  Mutation(
    "scale_fft_spectrum_mixed",  # ops.mixed_matmul, a set of adapters
    "ops/_fft.py",
    FFT_SPECTRUM,
    "return jnp.conj(jnp.fft.rfft(w.astype(dtype), axis=-1))",
    ("tests/test_adapters.py::test_each_row_computes_its_own_adapter_values_and_gradients",),
  ),
  Mutation(
    "scale_spectral",  # "freq_major"
    "ops/_spectral.py",
    SPECTRAL,
    "irfft_weights(b) / b, jnp.float32",
    (FORWARD,),
  ),
  Mutation(
    "scale_spectral_kernel_grad",  # the fold's kernel gradient (ops/_kernel_grad.py)
    "ops/_spectral.py",
    SPECTRAL,
    "irfft_weights(b) / b, jnp.float32",
    ("tests/test_strategies.py::test_kernel_grad_alone_matches_reference",),
  ),
  Mutation(
    "scale_spectral_pallas",  # c3a_jax/experimental/pallas.py
    "ops/_spectral.py",
    SPECTRAL,
    "irfft_weights(b) / b, jnp.float32",
    ("tests/test_pallas.py::test_values_and_gradients_match_dense_reference",),
  ),
  # 4. Transposes: the kernel into the layout rule's order, the NNX params view, Conv1D.
  Mutation(
    "flat_kernel_no_transpose",
    "_contraction.py",
    FLAT,
    "return kernel.reshape(self.d_in, self.d_out)",
    (LAYER_PATHS, NNX_LAYERS),
  ),
  Mutation(
    "nnx_view_read_no_transpose",
    "_nnx.py",
    VIEW_READ,
    "value = _merge_record.carry(value, value)",
    (NNX_LAYERS,),
  ),
  Mutation(
    "nnx_view_write_no_transpose",
    "_nnx.py",
    VIEW_WRITE,
    "value = _merge_record.carry(value, value)",
    (NNX_LAYERS,),
  ),
  Mutation(
    "nnx_view_write_perm_not_inverse",  # perm for argsort(perm): equal for a swap of two axes
    "_nnx.py",
    VIEW_WRITE,
    "value = _merge_record.carry(value, jnp.transpose(value, perm))",
    ("tests/test_nnx.py",),
  ),
  Mutation(
    "conv1d_contraction_swapped",
    "_contraction.py",
    'return Contraction.parse("...a,ba->...b", np.shape(x), shape, any_order=True)',
    'return Contraction.parse("...a,ab->...b", np.shape(x), shape, any_order=True)',
    (LINEN_PATHS,),
  ),
  # 5. The additive path: the delta not added, or added twice.
  Mutation("additive_no_delta", "_layer_call.py", DELTA_ADDED, "return y", (LAYER_PATHS,)),
  Mutation(
    "additive_delta_twice",
    "_layer_call.py",
    DELTA_ADDED,
    "return y + 2 * _qwix.outside(_delta)(call, y.dtype, strategy, index)",
    (LAYER_PATHS,),
  ),
  # The quantized base: C3A's delta inside Qwix's interception; a fold into a quantized kernel.
  Mutation(
    "qwix_delta_inside",
    "_layer_call.py",
    DELTA_ADDED,
    "return y + _delta(call, y.dtype, strategy, index)",
    ("tests/test_quantized.py",),
  ),
  Mutation(
    "quantized_fold_allowed",
    "_layer_call.py",
    'if strategy == "fold" and call.quantized:',
    "if False:",
    ("tests/test_quantized.py",),
  ),
  # 6. The fold decision inverted: the same values, another program (tests/test_precision.py
  # reads the lowered dots; tests/test_layer_paths.py counts calls of ops.fold).
  Mutation(
    "fold_decision_inverted",
    "_layer_call.py",
    FOLD_IF,
    'if strategy != "fold" and foldable:',
    ("tests/test_precision.py", LAYER_PATHS),
  ),
  # 7. PEFT export: a Flax (in, out) kernel saved as torch's (out, in) weight.
  Mutation(
    "peft_export_no_transpose",
    "_peft_io.py",
    TO_TORCH,
    'return "weight", value',
    (
      "tests/test_peft_io.py::test_file_layout_is_peft",
      "tests/test_shared_fixtures.py::test_adapter_round_trips_through_our_writer",
    ),
  ),
)

# Loaded by pytest (-p) before conftest.py, so before anything imports c3a_jax.
PLUGIN = '''\
import importlib.machinery
import os
import sys

_COPY = os.path.dirname(os.path.abspath(__file__))


class _CopyFirst:
  @staticmethod
  def find_spec(name, path=None, target=None):
    if name == "c3a_jax":
      return importlib.machinery.PathFinder.find_spec(name, [_COPY])
    return None


sys.meta_path.insert(0, _CopyFirst)


def pytest_unconfigure(config):
  module = sys.modules.get("c3a_jax")
  with open(os.path.join(_COPY, "imported.txt"), "w") as f:
    f.write(getattr(module, "__file__", None) or "")
'''
PLUGIN_NAME = "_c3a_mutate_plugin"
SANITY_MARK = "c3a_jax mutation copy: import broken on purpose"


class Stale(Exception):
  pass


@dataclasses.dataclass
class Result:
  name: str
  status: str  # caught, SURVIVED, TIMEOUT, ERROR, STALE
  first: str
  seconds: float


def _snapshot(to: Path) -> Path:
  """The package as it is now: every mutation starts from this one copy, whatever changes in
  the working tree while the check runs."""
  dest = to / PACKAGE
  shutil.copytree(ROOT / PACKAGE, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  return dest


def _edit(source: str, m: Mutation) -> str:
  lines = source.splitlines(keepends=True)
  hits = [i for i, line in enumerate(lines) if line.strip() == m.line]
  if len(hits) != 1:
    raise Stale(
      f"mutation {m.name!r} is stale: c3a_jax/{m.file} holds the line {m.line!r} "
      f"{len(hits)} times (it must hold it exactly once); update tests/mutate.py"
    )
  old = lines[hits[0]]
  indent = old[: len(old) - len(old.lstrip())]
  ending = old[len(old.rstrip("\r\n")) :]
  lines[hits[0]] = indent + m.new + ending
  return "".join(lines)


def stale(snapshot: Path, m: Mutation) -> str | None:
  """Why ``m`` no longer applies to ``snapshot``, or None."""
  path = snapshot / m.file
  if not path.is_file():
    return f"mutation {m.name!r} is stale: c3a_jax/{m.file} does not exist; update tests/mutate.py"
  try:
    _edit(path.read_text(), m)
  except Stale as e:
    return str(e)
  return None


def _first_failure(output: str) -> str:
  for line in output.splitlines():
    if re.match(r"^(FAILED|ERROR) ", line):
      return line.split(" - ")[0].split(" ", 1)[1]
  for line in output.splitlines():
    if "Error" in line or "error" in line:
      return line.strip()[:100]
  return ""


def run_pytest(snapshot: Path, tests, edit=None, timeout: float = 600) -> tuple[int | None, str]:
  """Runs ``tests`` against a copy of ``snapshot`` after ``edit(copy)``: pytest's exit code
  (None on timeout) and output."""
  with tempfile.TemporaryDirectory(prefix="c3a_mutant_") as tmp:
    tmp = Path(tmp)
    shutil.copytree(snapshot, tmp / PACKAGE)
    if edit is not None:
      edit(tmp / PACKAGE)
    (tmp / f"{PLUGIN_NAME}.py").write_text(PLUGIN)
    env = dict(
      os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp), os.environ.get("PYTHONPATH")]))
    )
    env.pop("PYTEST_ADDOPTS", None)
    cmd = [
      sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist",
      "-p", PLUGIN_NAME, "-o", "addopts=", "-m", "not integration", "-rfE", *tests,
    ]  # fmt: skip
    try:
      proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
      )
    except subprocess.TimeoutExpired as e:
      out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
      return None, out
    output = proc.stdout + proc.stderr
    imported = tmp / "imported.txt"
    if imported.exists():
      got = imported.read_text()
      if got and not got.startswith(str(tmp / PACKAGE)):
        raise RuntimeError(f"pytest imported c3a_jax from {got}, not the mutated copy in {tmp}")
    return proc.returncode, output


def sanity(snapshot: Path) -> None:
  """An edit that breaks ``import c3a_jax`` must fail the tests: else they see another copy."""

  def breaks_import(copy: Path):
    init = copy / "__init__.py"
    init.write_text(init.read_text() + f"\nraise ImportError({SANITY_MARK!r})\n")

  code, output = run_pytest(snapshot, [LAYER_PATHS], breaks_import, timeout=300)
  if code == 0 or SANITY_MARK not in output:
    raise RuntimeError(
      "the tests did not import the mutated copy of c3a_jax (an import-breaking edit went "
      f"unnoticed); pytest said:\n{output[-3000:]}"
    )


def _selection(mutations) -> list[str]:
  """The tests of ``mutations``, each once (a node id inside a whole file listed is dropped)."""
  tests = list(dict.fromkeys(t for m in mutations for t in m.tests))
  return [t for t in tests if "::" not in t or t.split("::")[0] not in tests]


def baseline(snapshot: Path, mutations) -> None:
  tests = _selection(mutations)
  start = time.monotonic()
  code, output = run_pytest(snapshot, tests)
  if code != 0:
    raise RuntimeError(
      f"the selected tests fail without any mutation (exit {code}), so no result would mean "
      f"anything; first failure: {_first_failure(output)}\n{output[-3000:]}"
    )
  print(f"baseline: {len(tests)} selections pass unedited ({time.monotonic() - start:.0f} s)")


def mutate(snapshot: Path, m: Mutation, timeout: float) -> Result:
  def edit(copy: Path):
    path = copy / m.file
    path.write_text(_edit(path.read_text(), m))

  start = time.monotonic()
  code, output = run_pytest(snapshot, m.tests, edit, timeout)
  seconds = time.monotonic() - start
  if code is None:
    return Result(m.name, "TIMEOUT", f"over {timeout:.0f} s", seconds)
  if code == 0:
    return Result(m.name, "SURVIVED", "", seconds)
  if code in (1, 2):  # tests failed, or collection did (-x stops at the first error)
    return Result(m.name, "caught", _first_failure(output), seconds)
  tail = output.strip().splitlines()[-1:] or [""]
  return Result(m.name, "ERROR", f"pytest exit {code}: {tail[0][:100]}", seconds)


def table(results) -> str:
  rows = [("mutation", "result", "first failing test", "s")]
  rows += [(r.name, r.status, r.first or "-", f"{r.seconds:.0f}") for r in results]
  widths = [max(len(row[i]) for row in rows) for i in range(4)]
  fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
  return "\n".join([fmt(rows[0]), fmt(tuple("-" * w for w in widths)), *map(fmt, rows[1:])])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", action="append", metavar="NAME", help="run this mutation only")
  parser.add_argument("--list", action="store_true", help="list the mutations and exit")
  parser.add_argument("--no-baseline", action="store_true", help="skip the unedited run")
  parser.add_argument("--timeout", type=float, default=600, help="seconds per mutation")
  args = parser.parse_args(argv)
  names = [m.name for m in MUTATIONS]
  assert len(set(names)) == len(names), "mutation names must be unique"
  if args.list:
    for m in MUTATIONS:
      print(f"{m.name}\n  c3a_jax/{m.file}: {m.line}\n    -> {m.new}")
      print("".join(f"  {t}\n" for t in m.tests), end="")
    return 0
  unknown = set(args.only or ()) - set(names)
  if unknown:
    parser.error(f"no mutation named {sorted(unknown)}; --list shows them")
  mutations = [m for m in MUTATIONS if not args.only or m.name in args.only]
  started = time.monotonic()
  with tempfile.TemporaryDirectory(prefix="c3a_snapshot_") as tmp:
    snapshot = _snapshot(Path(tmp))
    why = {m.name: stale(snapshot, m) for m in mutations}
    for reason in filter(None, why.values()):
      print(f"error: {reason}", file=sys.stderr)
    live = [m for m in mutations if why[m.name] is None]
    sanity(snapshot)
    if not args.no_baseline and live:
      baseline(snapshot, live)
    results = []
    for m in mutations:
      if why[m.name] is None:
        results.append(mutate(snapshot, m, args.timeout))
      else:
        results.append(Result(m.name, "STALE", f"line not found once in c3a_jax/{m.file}", 0.0))
      r = results[-1]
      print(f"{r.name}: {r.status} {r.first} ({r.seconds:.0f} s)", flush=True)
  print()
  print(table(results))
  survived = [r.name for r in results if r.status == "SURVIVED"]
  errors = [r.name for r in results if r.status in ("ERROR", "STALE")]
  print(f"\n{len(results)} mutations, {len(survived)} survived, {time.monotonic() - started:.0f} s")
  if errors:
    print(f"errors (no verdict): {errors}")
    return 2
  return 1 if survived else 0


if __name__ == "__main__":
  sys.exit(main())
