import os

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_FIXTURES = os.path.join(ROOT, "..", "shared", "fixtures")


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
  """Runs a test once as is and once under jax.jit."""
  return jax.jit if request.param else (lambda f: f)


@pytest.fixture
def shared_fixtures():
  """../shared/fixtures (made by PEFT); skips cleanly where a fresh clone has none."""
  if not os.path.isdir(SHARED_FIXTURES):
    pytest.skip("../shared/fixtures is absent (fresh clone)")
  return SHARED_FIXTURES
