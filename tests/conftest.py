import os

# Eight host CPU devices for the pmap / sharded-jit tests (tests/backend.py hands them out), the
# CPU platform kept beside the one JAX_PLATFORMS chose (its first stays the default); set before
# JAX starts.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
if os.environ.get("JAX_PLATFORMS") and "cpu" not in os.environ["JAX_PLATFORMS"].split(","):
  os.environ["JAX_PLATFORMS"] += ",cpu"

# pytest -n N on one GPU: each worker takes the memory it needs, not 75% of the card.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# The tests make everything they load; never wait on a hub that this machine cannot reach.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax
import pytest
from hypothesis import settings

from tests import backend

# Property tests draw few examples (each compiles a model); HYPOTHESIS_PROFILE=thorough for more.
settings.register_profile("fast", max_examples=4, deadline=None)
settings.register_profile("thorough", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_FIXTURES = os.path.join(ROOT, "..", "shared", "fixtures")


def pytest_configure(config):
  # The default tier draws its test data with XLA's RngBitGenerator: JAX's default threefry
  # compiles a kernel per new shape (0.3-1.5 s each on CPU), and the tests draw many shapes.
  # Any other selection (the integration tier, -m "") keeps JAX's default, as users and the
  # subprocesses the tests start have it (tests compare against them; training runs are seeded).
  if (config.getoption("markexpr") or "").strip() == "not integration":
    jax.config.update("jax_default_prng_impl", "rbg")


@pytest.fixture(autouse=True)
def _float32_base(request):
  """Full float32 matmuls for every test but those marked ``backend_precision``: the frozen
  layer's own product keeps XLA's default (TF32 on GPUs), which float32 references do not."""
  if request.node.get_closest_marker("backend_precision"):
    yield
    return
  with backend.float32_matmuls():
    yield


@pytest.fixture(
  params=[pytest.param(False, marks=pytest.mark.integration), True], ids=["eager", "jit"]
)
def maybe_jit(request):
  """Runs a test under jax.jit and, in the integration tier, also eagerly."""
  return jax.jit if request.param else (lambda f: f)


@pytest.fixture(scope="session")
def shared_fixtures():
  """../shared/fixtures (made by PEFT); skips cleanly where a fresh clone has none."""
  if not os.path.isdir(SHARED_FIXTURES):
    pytest.skip("../shared/fixtures is absent (fresh clone)")
  return SHARED_FIXTURES


@pytest.fixture
def alias_bomb():
  """A YAML alias bomb: 9 levels of 9 references, 9**9 strings when printed whole."""
  import yaml

  bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}" + f", *{chr(97 + i)}" * 8 + "]\n"
    for i in range(8)
  )
  return yaml.safe_load(bomb)["i"]
