"""The notebooks run top to bottom in a fresh Jupyter kernel and reach their results.

Each notebook runs with nbclient in a kernel of this very interpreter (a kernel spec written to
a temporary JUPYTER_PATH, so nothing is installed and no other "python3" kernel is picked up),
with a temporary working directory and a temporary C3A_JAX_CACHE.
"""

import json
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.integration

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
RESULT = "NOTEBOOK_TEST_RESULT "


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """One pretrained digits MLP for both notebooks (per test process)."""
  return str(tmp_path_factory.mktemp("c3a-cache"))


def run_notebook(name, tmp_path, monkeypatch, cache_dir, probe=None):
  """Executes notebooks/``name``; returns (notebook, the JSON printed by ``probe``, if any).

  ``probe`` is code appended as a last cell; what it passes to ``report(...)`` comes back.
  """
  from ipykernel.kernelspec import write_kernel_spec

  jupyter = tmp_path / "jupyter"
  write_kernel_spec(path=str(jupyter / "kernels" / "python3"))  # argv: sys.executable
  monkeypatch.setenv("JUPYTER_PATH", str(jupyter))
  monkeypatch.setenv("C3A_JAX_CACHE", cache_dir)
  monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows figures
  # conftest.py forces 8 host devices for this process; the kernel gets a user's default.
  flags = [
    f
    for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  ]
  monkeypatch.setenv("XLA_FLAGS", " ".join(flags))
  workdir = tmp_path / "work"
  workdir.mkdir()

  with open(os.path.join(NOTEBOOKS, name)) as f:
    nb = nbformat.read(f, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:  # saved without outputs: a small diff in the repository
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, f"{name}: outputs not cleared"
  if probe is not None:
    nb.cells.append(
      nbformat.v4.new_code_cell(
        "import json as _json\n"
        f"def report(value):\n  print({RESULT!r} + _json.dumps(value))\n" + probe
      )
    )
  client = nbclient.NotebookClient(
    nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(workdir)}}
  )
  client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
  result = None
  for line in stream_text(nb).splitlines():
    if line.startswith(RESULT):
      result = json.loads(line[len(RESULT) :])
  assert os.listdir(workdir) == [], f"{name} wrote into its working directory"
  return nb, result


def stream_text(nb, cells=None):
  """Everything the code cells printed to stdout."""
  return "".join(
    out.get("text", "")
    for cell in (cells or nb.cells)
    if cell.cell_type == "code"
    for out in cell.outputs
    if out.output_type == "stream" and out.get("name") == "stdout"
  )


def test_quickstart(tmp_path, monkeypatch, cache_dir):
  nb, after = run_notebook(
    "quickstart.ipynb", tmp_path, monkeypatch, cache_dir, probe="report(after)"
  )
  text = stream_text(nb)
  assert "trainable params: 2,181 || all params: 27,013" in text
  assert "loaded adapter: same config, same weights, same logits" in text
  assert "all quickstart checks passed" in text
  assert after["accuracy"] > 0.9


def test_comparison(tmp_path, monkeypatch, cache_dir):
  nb, results = run_notebook(
    "comparison.ipynb",
    tmp_path,
    monkeypatch,
    cache_dir,
    probe="report({'results': results, 'ranks': RANKS})",
  )
  ranks, results = {int(b): r for b, r in results["ranks"].items()}, results["results"]
  head, full = results["head only"], results["full fine-tuning"]
  assert head["params"] == 645 and full["params"] == 25_477
  for b, r in ranks.items():
    c3a, lora = results[f"C3A b={b}"], results[f"LoRA r={r}"]
    assert len(c3a["accs"]) == len(lora["accs"]) == 3
    assert c3a["params"] == 24_576 // b + 645
    assert 0.75 < (lora["params"] - 645) / (c3a["params"] - 645) < 1.33, (b, r)  # matched budget
    # The point of the task: adapting the hidden layers beats training the head alone.
    assert c3a["acc_mean"] > head["acc_mean"] + 0.03, (b, c3a, head)
    assert lora["acc_mean"] > head["acc_mean"] + 0.03, (r, lora, head)
  assert full["acc_mean"] > head["acc_mean"] + 0.03
  # The table and the plot were shown.
  table = stream_text(nb)
  for name in results:
    assert any(line.startswith(name) for line in table.splitlines()), name
  images = [
    out
    for cell in nb.cells
    if cell.cell_type == "code"
    for out in cell.outputs
    if "image/png" in out.get("data", {})
  ]
  assert len(images) == 1
