"""The README's Python blocks run top to bottom, and print what the README says they print.

The Quickstart runs first on its own, in a fresh interpreter where the packages of the
``[cli]``, ``[hf]`` and ``[interop]`` extras cannot be imported: what ``pip install -e .``
alone gives.
"""

import contextlib
import io
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
# What the extras bring; pyyaml is left importable because flax itself depends on it.
EXTRAS = [
  "tqdm",
  "matplotlib",
  "sklearn",
  "transformers",
  "datasets",
  "huggingface_hub",
  "PIL",
  "torch",
  "peft",
]


def _blocks(text):
  return re.findall(r"```python\n(.*?)```", text, re.S)


def test_quickstart_runs_with_the_library_alone(tmp_path):
  text = open(README).read()
  section = text[text.index("## Quickstart") : text.index("## Recipes")]
  (quickstart,) = _blocks(section)
  script = tmp_path / "quickstart.py"
  script.write_text(f"import sys\nsys.modules.update(dict.fromkeys({EXTRAS!r}))\n" + quickstart)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(
    [sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
  )
  assert out.returncode == 0, out.stderr[-3000:]
  for expected in re.findall(r"print\(.*\)\n# (.*)\n", section):
    assert expected in out.stdout
  loss = float(re.search(r"loss after 50 steps: ([\d.]+)", out.stdout).group(1))
  assert loss < 0.1  # ln 2 = 0.69 at the start: the adapter learned the toy task


def test_readme_python_blocks_run():
  text = open(README).read()
  blocks = _blocks(text)
  assert len(blocks) >= 4
  out = io.StringIO()
  namespace = {}
  with contextlib.redirect_stdout(out):
    for block in blocks:
      exec(compile(block, README, "exec"), namespace)
  printed = out.getvalue()
  for expected in re.findall(r"print\(.*\)\n# (.*)\n", text):
    assert expected in printed
  assert "tokens/s" in printed
