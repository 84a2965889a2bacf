"""Every docstring example in the package runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import pytest

import c3a_jax

MODULES = sorted(
  m.name
  for m in pkgutil.walk_packages(c3a_jax.__path__, "c3a_jax.")
  if not m.name.endswith("__main__")
)
# Modules that need no example of their own: internals whose public functions are shown where
# they are re-exported, and the command-line app over the library.
NO_EXAMPLE = {
  "c3a_jax._context",
  "c3a_jax._tree",
  "c3a_jax.experimental",
  "c3a_jax.ops._fft",
  "c3a_jax.ops._freq_major",
  "c3a_jax.ops._spectral",
  "c3a_jax.cli",
  "c3a_jax.cli.commands",
  "c3a_jax.cli.digits",
  "c3a_jax.cli.hub",
  "c3a_jax.cli.job",
  "c3a_jax.cli.runner",
  "c3a_jax.cli.tunix",
}


def test_every_module_is_listed():
  assert set(MODULES) >= NO_EXAMPLE, NO_EXAMPLE - set(MODULES)
  assert {"c3a_jax._transform", "c3a_jax.ops._fold", "c3a_jax.training._step"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_module_examples(name):
  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 or name in NO_EXAMPLE, f"{name} has no runnable example"
  assert result.failed == 0
