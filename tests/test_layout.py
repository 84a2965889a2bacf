"""The package's shape: imports flow one way, and the library needs none of the app's packages.

* No import cycle among c3a_jax's modules (every import counts, also those inside functions).
* ``c3a_jax.ops`` imports nothing else from c3a_jax but ``c3a_jax._compat`` (the deprecated
  names), which imports nothing from it: together they are the bottom layer.
* The library never imports ``c3a_jax.cli``; ``c3a_jax.training`` and ``c3a_jax.experimental``
  sit beside it, over the library.
* No private import across package boundaries: a private module or name (``_x``) is used only
  inside the package that holds it (``c3a_jax.ops._spectral`` only in ``c3a_jax.ops``,
  ``c3a_jax.training._step`` only in ``c3a_jax.training``), and what sits over the library
  (``c3a_jax.training``, ``c3a_jax.experimental``, the command line) uses none of the library's
  (``c3a_jax._nnx``), only its public names, ``c3a_jax._compat`` aside.
* No function in the library (the command line aside) runs past 60 lines, its docstring aside.
* ``import c3a_jax`` (and the README's quickstart) loads none of the ``[cli]`` extra's packages.
"""

import ast
import os
import subprocess
import sys
import textwrap

import pytest

import c3a_jax

PACKAGE = os.path.dirname(c3a_jax.__file__)


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, os.path.dirname(PACKAGE))[: -len(".py")].replace(os.sep, ".")
  return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _modules() -> dict[str, str]:
  """c3a_jax's modules by dotted name, each with its file."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(PACKAGE) for f in fs if f.endswith(".py")]
  return {_module_name(f): f for f in files}


def _from_base(node: ast.ImportFrom, package: str) -> str:
  """The module a ``from ... import`` in ``package`` reads (relative imports resolved)."""
  base = node.module or ""
  if node.level:
    up = package.split(".")[: len(package.split(".")) - node.level + 1]
    base = ".".join(up + ([base] if base else []))
  return base


def _home(base: str, attr: str, modules: dict[str, str], exports: dict) -> str:
  """The module ``base.attr`` comes from: the submodule, else the module ``base``'s
  ``__init__`` imports the name from, else ``base``."""
  full = f"{base}.{attr}"
  return full if full in modules else exports.get(base, {}).get(attr, base)


def _exports(modules: dict[str, str]) -> dict[str, dict[str, str]]:
  """package -> {each name its ``__init__`` imports: the module it comes from}
  (``c3a_jax``: ``{"combine": "c3a_jax._transform", "io": "c3a_jax.io", ...}``)."""
  out = {}
  for name, path in modules.items():
    if path.endswith("__init__.py"):
      out[name] = {
        a.asname or a.name: _home(_from_base(node, name), a.name, modules, {})
        for node in ast.parse(open(path).read(), path).body
        if isinstance(node, ast.ImportFrom)
        for a in node.names
      }
  return out


def _reached(tree: ast.AST, alias: str, package: str, modules: dict, exports: dict) -> list[str]:
  """The modules behind each ``alias.name`` in ``tree`` (``import package as alias``), and
  ``package`` itself where ``alias`` is used otherwise than for an attribute."""
  names = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == alias]
  attrs = [
    n.attr
    for n in ast.walk(tree)
    if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == alias
  ]
  bare = len(names) > len(attrs)  # the package itself passed on or read: all of it
  return [_home(package, a, modules, exports) for a in attrs] + ([package] if bare else [])


def _graph() -> dict[str, set[str]]:
  """module -> the c3a_jax modules it imports (``from pkg import sub`` names the submodule).

  After ``import c3a_jax as c3a``, ``c3a.combine`` is an edge to the module the package's
  ``__init__`` takes the name from (``c3a_jax._transform``), not to the package: a name read
  from the package when called needs only its module. So ``c3a_jax.training``, which the
  package imports, uses the library's public names (read at import time, before ``c3a_jax``
  binds them, they would fail ``import c3a_jax``, and every test). ``from c3a_jax import
  combine`` needs the package itself, whole: an edge to it."""
  modules = _modules()
  exports = _exports(modules)
  graph = {}
  for name, path in modules.items():
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    tree = ast.parse(open(path).read(), path)
    targets = []
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        for a in node.names:
          if a.name in exports and (a.asname or "." not in a.name):
            targets += _reached(tree, a.asname or a.name, a.name, modules, exports)
          else:
            targets.append(a.name)
      elif isinstance(node, ast.ImportFrom):
        base = _from_base(node, package)
        targets += [_home(base, a.name, modules, {}) for a in node.names]
    graph[name] = {t for t in targets if t in modules and t != name}
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


def test_names_read_from_the_package_lead_to_their_modules():
  modules = dict.fromkeys(["c3a_jax", "c3a_jax._transform", "c3a_jax.ops"], "")
  exports = {"c3a_jax": {"combine": "c3a_jax._transform", "ops": "c3a_jax.ops"}}
  tree = ast.parse("import c3a_jax as c3a\ndef f(x):\n  return c3a.combine(x, c3a.ops.PRECISION)")
  assert sorted(_reached(tree, "c3a", "c3a_jax", modules, exports)) == [
    "c3a_jax._transform",
    "c3a_jax.ops",
  ]
  tree = ast.parse("import c3a_jax as c3a\nc3a.__version__, print(c3a)")  # not a re-export; bare
  assert _reached(tree, "c3a", "c3a_jax", modules, exports) == ["c3a_jax", "c3a_jax"]
  graph = _graph()  # training reads the library's names when called: c3a_jax imports training
  assert {"c3a_jax._intercept", "c3a_jax._transform"} <= graph["c3a_jax.training._step"]
  assert "c3a_jax" not in graph["c3a_jax.training._step"]


def test_no_import_cycle():
  assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_a_cycle_would_be_found():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_ops_imports_nothing_else_from_the_package():
  for name, edges in _graph().items():
    if name == "c3a_jax.ops" or name.startswith("c3a_jax.ops."):
      outside = {e for e in edges if not _inside(e, "c3a_jax.ops") and e != COMPAT}
      assert not outside, f"{name} imports {sorted(outside)}"
  assert not _graph()[COMPAT], f"{COMPAT} imports {sorted(_graph()[COMPAT])}"


def test_layers_import_one_way():
  def layer(name):
    for prefix, rank in (
      ("c3a_jax.cli", 3),
      ("c3a_jax.__main__", 3),
      ("c3a_jax.training", 2),
      ("c3a_jax.experimental", 2),
      ("c3a_jax.ops", 0),
      (COMPAT, -1),
    ):
      if name == prefix or name.startswith(prefix + "."):
        return rank
    return 1  # the adapter library

  for name, edges in _graph().items():
    for e in edges:
      if name == "c3a_jax":
        continue  # the package's public list re-exports ops, the library and training
      assert layer(e) <= layer(name), f"{name} (layer {layer(name)}) imports {e} ({layer(e)})"


COMPAT = "c3a_jax._compat"  # the deprecated names: for every layer, and it imports nothing
APP = "c3a_jax.cli"  # the command line: over the library's public names
# Over the library too, and so on its public names: what they need is public in the library.
OVER = (APP, "c3a_jax.training", "c3a_jax.experimental")


def _inside(name: str, package: str) -> bool:
  return name == package or name.startswith(package + ".")


def _is_private(part: str) -> bool:
  return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _uses() -> dict[str, list[tuple[str, int]]]:
  """module -> every c3a_jax name it imports or reaches by attribute
  (``ops._spectral.ordered_after`` from ``from c3a_jax import ops``), as a dotted path, with its
  line."""
  uses = {}
  for name, path in _modules().items():
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    bound, found = {}, []  # local name -> the c3a_jax path it stands for
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        for a in node.names:
          found.append((a.name, node.lineno))
          bound[a.asname or a.name.partition(".")[0]] = a.name if a.asname else a.name.split(".")[0]
      elif isinstance(node, ast.ImportFrom):
        base = _from_base(node, package)
        for a in node.names:
          found.append((f"{base}.{a.name}", node.lineno))
          bound[a.asname or a.name] = f"{base}.{a.name}"
    for node in ast.walk(tree):
      chain, value = [], node
      while isinstance(value, ast.Attribute):
        chain.append(value.attr)
        value = value.value
      if chain and isinstance(value, ast.Name) and value.id in bound:
        found.append((".".join([bound[value.id], *reversed(chain)]), node.lineno))
    uses[name] = [(n, line) for n, line in found if _inside(n, "c3a_jax")]
  return uses


def _packages() -> set[str]:
  return {
    _module_name(os.path.join(d, "__init__.py"))
    for d, _, fs in os.walk(PACKAGE)
    if "__init__.py" in fs
  }


def _private_owner(name: str, packages: set[str]) -> str | None:
  """The package holding ``name``'s first private part (``c3a_jax.ops._spectral.ordered_after`` ->
  ``c3a_jax.ops``; ``c3a_jax.cli.hub._limit`` -> ``c3a_jax.cli``), None if it has none."""
  parts = name.split(".")
  for i, part in enumerate(parts):
    if _is_private(part):
      owner = ".".join(parts[:i])
      while owner not in packages:
        owner = owner.rpartition(".")[0]
      return owner
  return None


def _over(module: str) -> str | None:
  """The package over the library that holds ``module`` (``__main__`` runs the app's), or None."""
  if module == "c3a_jax.__main__":
    return APP
  return next((p for p in OVER if _inside(module, p)), None)


def _private_crossings(uses: dict, packages: set[str]) -> list[str]:
  out = []
  for module, names in uses.items():
    for name, line in names:
      owner = _private_owner(name, packages)
      if owner is None or _inside(name, COMPAT):
        continue
      over = _over(module)
      if not _inside(module, owner) or (over and not _inside(owner, over)):
        out.append(f"{module}:{line} uses {name} (private to {owner})")
  return sorted(set(out))


def test_no_private_import_across_package_boundaries():
  crossings = _private_crossings(_uses(), _packages())
  assert not crossings, "\n".join(crossings)


def test_a_private_crossing_would_be_found():
  packages = {"c3a_jax", "c3a_jax.ops", "c3a_jax.training", "c3a_jax.cli"}
  uses = {
    "c3a_jax.cli.runner": [("c3a_jax._io.atomic_write", 1), ("c3a_jax.cli.hub._limit", 2)],
    "c3a_jax._intercept": [("c3a_jax.ops._strategy.takes_fold", 3), ("c3a_jax._tree", 4)],
    "c3a_jax.cli.commands": [("c3a_jax.training._step.make_train_step", 5)],
    "c3a_jax.ops._strategy": [("c3a_jax._compat.renamed_strategy", 7)],
    "c3a_jax.training._step": [
      ("c3a_jax._intercept.intercept", 8),
      ("c3a_jax.intercept", 9),
      ("c3a_jax.training._counters.Throughput", 10),
      ("c3a_jax._compat.upgrade_checkpoint_config", 11),
    ],
    "c3a_jax.experimental.pallas": [
      ("c3a_jax.ops._spectral.dft_halves", 6),
      ("c3a_jax._tree.is_box", 12),
    ],
    "c3a_jax.tree": [("c3a_jax._tree.is_box", 13)],
  }
  assert _private_crossings(uses, packages) == [
    "c3a_jax._intercept:3 uses c3a_jax.ops._strategy.takes_fold (private to c3a_jax.ops)",
    "c3a_jax.cli.commands:5 uses c3a_jax.training._step.make_train_step (private to "
    "c3a_jax.training)",
    "c3a_jax.cli.runner:1 uses c3a_jax._io.atomic_write (private to c3a_jax)",
    "c3a_jax.experimental.pallas:12 uses c3a_jax._tree.is_box (private to c3a_jax)",
    "c3a_jax.experimental.pallas:6 uses c3a_jax.ops._spectral.dft_halves (private to c3a_jax.ops)",
    "c3a_jax.training._step:8 uses c3a_jax._intercept.intercept (private to c3a_jax)",
  ]


MAX_LINES = 60  # of a function: from its first statement past the docstring to its last line


def _long_functions(source: str, where: str, limit: int = MAX_LINES) -> list[str]:
  """``where:line name: n lines`` for each function in ``source`` (methods and nested ones
  too, named ``Class.method``, ``outer.inner``) longer than ``limit`` lines, its docstring
  aside: split into named steps, each is read on its own."""
  out = []

  def visit(node: ast.AST, prefix: str) -> None:
    for child in ast.iter_child_nodes(node):
      name = prefix
      if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        name = f"{prefix}{child.name}."
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
        body = child.body[1:] if ast.get_docstring(child, clean=False) is not None else child.body
        lines = child.end_lineno - body[0].lineno + 1 if body else 0
        if lines > limit:
          out.append(f"{where}:{child.lineno} {name[:-1]}: {lines} lines")
      visit(child, name)

  visit(ast.parse(source, where), "")
  return out


def test_no_function_runs_past_60_lines():
  """The library's functions (the command line's aside) stay short enough to read whole."""
  root = os.path.dirname(PACKAGE)
  found = [
    long
    for name, path in sorted(_modules().items())
    if not _inside(name, APP)
    for long in _long_functions(open(path).read(), os.path.relpath(path, root))
  ]
  assert not found, f"over {MAX_LINES} lines; split into named steps:\n" + "\n".join(found)


def test_a_long_function_would_be_found():
  source = textwrap.dedent(
    '''\
    def short():
      """A docstring
      of four lines,
      not counted."""
      x = 1
      return x


    class Box:
      def long(self):
        """One line."""
        x = 1

        def inner():
          return x

        return inner
    '''
  )
  assert _long_functions(source, "m.py", limit=6) == []
  assert _long_functions(source, "m.py", limit=5) == ["m.py:10 Box.long: 6 lines"]
  # short's docstring is not counted (with it, short would be 5 lines); inner is 1 line.
  assert _long_functions(source, "m.py", limit=2) == ["m.py:10 Box.long: 6 lines"]
  assert _long_functions(source, "m.py", limit=1) == [
    "m.py:1 short: 2 lines",
    "m.py:10 Box.long: 6 lines",
  ]


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
y = jax.jit(c3a.intercepted(mlp.apply))({{"params": params}}, jnp.ones((2, 16)))
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
