"""The README's Python blocks run top to bottom, and print what the README says they print."""

import contextlib
import io
import os
import re

import pytest

pytest.importorskip("transformers")

pytestmark = pytest.mark.integration

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_python_blocks_run():
  text = open(README).read()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert len(blocks) >= 2
  out = io.StringIO()
  namespace = {}
  with contextlib.redirect_stdout(out):
    for block in blocks:
      exec(compile(block, README, "exec"), namespace)
  printed = out.getvalue()
  # A comment line right after a print() states its output.
  for expected in re.findall(r"print\(.*\)\n# (.*)\n", text):
    assert expected in printed
  loss = float(re.search(r"loss after 50 steps: ([\d.]+)", printed).group(1))
  assert loss < 0.35  # ln 2 = 0.69 at the start: the adapter learned the toy task
