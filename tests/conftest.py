import os

# Eight host CPU devices for the pmap / sharded-jit tests; set before JAX starts.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

# The tests make everything they load; never wait on a hub that this machine cannot reach.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

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
