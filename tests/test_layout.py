"""The package's shape: imports flow one way, and the library needs none of the app's packages.

* No import cycle among c3a_jax's modules (every import counts, also those inside functions).
* ``c3a_jax.ops`` imports nothing else from c3a_jax: it is the bottom layer.
* The library never imports ``c3a_jax.cli``; ``c3a_jax.training`` and ``c3a_jax.experimental``
  sit beside it, over the library.
* ``import c3a_jax`` (and the README's quickstart) loads none of the ``[cli]`` extra's packages.
"""

import ast
import os
import subprocess
import sys

import pytest

import c3a_jax

PACKAGE = os.path.dirname(c3a_jax.__file__)


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, os.path.dirname(PACKAGE))[: -len(".py")].replace(os.sep, ".")
  return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _graph() -> dict[str, set[str]]:
  """module -> the c3a_jax modules it imports (``from pkg import sub`` names the submodule)."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(PACKAGE) for f in fs if f.endswith(".py")]
  modules = {_module_name(f): f for f in files}
  graph = {}
  for name, path in modules.items():
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          base = ".".join(
            package.split(".")[: len(package.split(".")) - node.level + 1]
            + ([base] if base else [])
          )
        targets = [
          f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
        ]
      else:
        continue
      edges |= {t for t in targets if t in modules and t != name}
    graph[name] = edges
  return graph


def _cycle(graph: dict[str, set[str]]):
  state = {}

  def visit(node, stack):
    state[node] = "open"
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state and (found := visit(nxt, stack + [nxt])):
        return found
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node, [node])):
      return found
  return None


def test_the_graph_is_read():
  graph = _graph()
  assert "c3a_jax.ops._fold" in graph["c3a_jax.ops._matmul"]
  assert "c3a_jax._transform" in graph["c3a_jax"]
  assert "c3a_jax.cli.job" in graph["c3a_jax.cli.runner"]


def test_no_import_cycle():
  assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_a_cycle_would_be_found():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_ops_imports_nothing_else_from_the_package():
  for name, edges in _graph().items():
    if name == "c3a_jax.ops" or name.startswith("c3a_jax.ops."):
      outside = {e for e in edges if not (e == "c3a_jax.ops" or e.startswith("c3a_jax.ops."))}
      assert not outside, f"{name} imports {sorted(outside)}"


def test_layers_import_one_way():
  def layer(name):
    for prefix, rank in (
      ("c3a_jax.cli", 3),
      ("c3a_jax.__main__", 3),
      ("c3a_jax.training", 2),
      ("c3a_jax.experimental", 2),
      ("c3a_jax.ops", 0),
    ):
      if name == prefix or name.startswith(prefix + "."):
        return rank
    return 1  # the adapter library

  for name, edges in _graph().items():
    for e in edges:
      if name == "c3a_jax":
        continue  # the package's public list re-exports ops, the library and training
      assert layer(e) <= layer(name), f"{name} (layer {layer(name)}) imports {e} ({layer(e)})"


# The [cli] extra's packages and those of the other extras (pyyaml comes with flax itself).
APP_PACKAGES = [
  "tqdm",
  "matplotlib",
  "sklearn",
  "transformers",
  "datasets",
  "torch",
  "peft",
  "tunix",
  "qwix",
]


@pytest.mark.integration  # a fresh interpreter: slow; the README's quickstart test also covers it
def test_the_library_needs_no_app_package():
  """``import c3a_jax`` with the [cli] extra's packages made unimportable still works."""
  code = f"""
import sys
sys.modules.update(dict.fromkeys({APP_PACKAGES!r}))  # None: the import fails, as if not installed
import jax, jax.numpy as jnp, flax.linen as nn, optax
import c3a_jax as c3a
assert "orbax.checkpoint" not in sys.modules  # imported by the first Checkpointer only
import c3a_jax.training
mlp = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(8)])
params = mlp.init(jax.random.key(0), jnp.ones((1, 16)))["params"]
cfg = c3a.C3AConfig(block_size=8, target_modules="all-linear")
params = c3a.attach(params, cfg, jax.random.key(1))
y = jax.jit(c3a.wrap(mlp.apply))({{"params": params}}, jnp.ones((2, 16)))
assert y.shape == (2, 8)
print("ok")
"""
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(PACKAGE)
  )
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_cli_without_its_extra_says_what_to_install():
  code = f"""
import sys
sys.modules.update(dict.fromkeys({APP_PACKAGES!r}))  # None: the import fails, as if not installed
from c3a_jax.cli import main
sys.exit(main(["train", "--quiet"]))
"""
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(PACKAGE)
  )
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'pip install "c3a-jax[cli]"' in out.stderr and "'tqdm'" in out.stderr
