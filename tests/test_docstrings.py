"""Every docstring example in the library runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import pytest

import c3a_jax

MODULES = [m.name for m in pkgutil.iter_modules(c3a_jax.__path__, "c3a_jax.")
           if not m.name.split(".")[-1].startswith("_")]
# The CLI's own modules (an application over the library) need no example of their own.
APPLICATION = {"c3a_jax.cli", "c3a_jax.runner", "c3a_jax.hub", "c3a_jax.job", "c3a_jax.digits"}


@pytest.mark.parametrize("name", MODULES)
def test_module_examples(name):
  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 or name in APPLICATION, f"{name} has no runnable example"
  assert result.failed == 0
