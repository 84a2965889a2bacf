"""The deprecated names live in one module, c3a_jax/_compat.py, and go in the release it names.

The behaviour of each old name (warning, mapping) is tested where its new name is:
test_strategies.py (``"merged"``, a 0.1 ``adapter_config.json``), test_config.py and
test_cli.py (a 0.1 command config). Here: the moved and renamed top-level names, that every
entry names a release still to come, and that no other module spells an old strategy name.
"""

import ast
import os
import re

import pytest

import c3a_jax as c3a
from c3a_jax import _compat


def _version(text: str) -> tuple[int, ...]:
  return tuple(int(p) for p in re.match(r"\d+(\.\d+)*", text).group().split("."))


@pytest.mark.parametrize("name", sorted(_compat.MOVED_TO_TRAINING))
def test_a_moved_name_warns_naming_the_callers_line_and_its_release(name):
  with pytest.warns(DeprecationWarning, match=rf"c3a_jax.{name} is deprecated.*0\.3") as record:
    value = getattr(c3a, name)
  assert value is getattr(c3a.training, name)
  assert record[0].filename == __file__
  assert name not in c3a.__all__


@pytest.mark.parametrize("old", sorted(_compat.RENAMED))
def test_a_renamed_name_warns_and_is_the_new_one(old):
  new, _ = _compat.RENAMED[old]
  with pytest.warns(DeprecationWarning, match=rf"c3a_jax.{old} is deprecated; use c3a_jax.{new}"):
    value = getattr(c3a, old)
  assert value is getattr(c3a, new)
  assert old not in c3a.__all__ and new in c3a.__all__


def test_an_unknown_top_level_name_is_an_attribute_error():
  with pytest.raises(AttributeError, match="module 'c3a_jax' has no attribute 'make_meshes'"):
    c3a.make_meshes  # noqa: B018
  assert not hasattr(c3a, "nothing_here")


def test_every_deprecation_goes_in_a_release_still_to_come():
  releases = {
    **{f"c3a_jax.{n}": r for n, r in _compat.MOVED_TO_TRAINING.items()},
    **{f"strategy={n!r}": r for n, r in _compat.RENAMED_STRATEGIES.items()},
    **{f"c3a_jax.{n}": r for n, (_, r) in _compat.RENAMED.items()},
    "the 0.1 strategy field": _compat.STRATEGY_FIELD,
  }
  for what, release in releases.items():
    assert _version(c3a.__version__) < _version(release), (
      f"c3a-jax {c3a.__version__} is the release that drops {what}: delete it from "
      "c3a_jax/_compat.py and its call, and say so in CHANGELOG.md"
    )


def test_renamed_strategies_are_old_strategies():
  assert set(_compat.RENAMED_STRATEGIES) <= set(_compat.OLD_STRATEGIES)
  assert set(_compat.OLD_STRATEGIES.values()) <= set(c3a.ops.STRATEGIES)
  assert not set(_compat.OLD_STRATEGIES) & set(c3a.ops.STRATEGIES)


def test_no_other_module_spells_an_old_strategy_name():
  package = os.path.dirname(c3a.__file__)
  found = []
  for directory, _, files in os.walk(package):
    for f in files:
      path = os.path.join(directory, f)
      if not f.endswith(".py") or path == _compat.__file__:
        continue
      for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Constant) and node.value in _compat.OLD_STRATEGIES:
          found.append(f"{os.path.relpath(path, package)}:{node.lineno} {node.value!r}")
  assert not found, found


def test_a_0_1_value_too_large_to_show_is_named_by_its_type():
  bomb = [[["x"] * 1000] * 1000] * 1000  # a YAML alias bomb's shape: a billion strings
  with pytest.warns(FutureWarning, match=r"train.strategy=<list>; c3a-jax 0\.3 stops") as w:
    out = _compat.upgrade_experiment({"c3a": {"strategy": bomb}}, "old.yaml")
  assert len(str(w[0].message)) < 300
  assert out == {"c3a": {}, "train": {"strategy": bomb}}  # validation refuses it, by its key
  with pytest.warns(UserWarning, match=r"a.json: ignoring strategy='x{56}\.\.\., which"):
    assert _compat.upgrade_adapter_config({"strategy": "x" * 1000}, "a.json") == {}
