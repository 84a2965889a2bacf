"""The precision contract, checked where no accelerator runs: every matmul of the C3A math
states ``HIGHEST`` in the lowered program, so XLA's default float32 precision (TF32 on NVIDIA
GPUs, one bfloat16 pass on TPUs) never reaches the delta; a frozen layer's own product keeps
the precision its user gave it.

Lowering is backend-independent up to the paths a backend picks, so every path is lowered
here by name (each strategy, the kernel gradient's CPU and accelerator forms).
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import c3a_jax as c3a
from c3a_jax import ops
from c3a_jax.ops import _kernel_grad

pytestmark = pytest.mark.backend_precision

_DOT = re.compile(r"stablehlo\.dot_general .*?precision = \[(\w+), (\w+)\]")
# Marks the frozen layer's product: a precision no C3A matmul uses.
BASE = jax.lax.Precision.HIGH


def dot_precisions(fn, *args) -> list[str]:
  """The precision of each dot in ``jit(fn)``'s lowered program, lowered at XLA's default."""
  text = jax.jit(fn).lower(*args).as_text()
  dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
  found = [_DOT.search(line) for line in dots]
  assert all(found), [d for d, f in zip(dots, found, strict=True) if not f]
  return [a if a == b else f"{a}/{b}" for a, b in (f.groups() for f in found)]


def fwd_bwd(f):
  """The forward value and the gradients with respect to every argument."""
  return lambda *args: jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(f(*a))), range(len(args)))(
    *args
  )


def _arrays(dtype, m=3, n=2, b=16, tokens=40):
  keys = jax.random.split(jax.random.key(0), 2)
  return jax.random.normal(keys[0], (tokens, n * b), dtype), jax.random.normal(keys[1], (m, n, b))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("strategy", ops.STRATEGIES)
def test_every_strategy_states_highest(strategy, dtype):
  x, w = _arrays(dtype)
  got = dot_precisions(
    fwd_bwd(lambda x, w: ops.block_circulant_matmul(x, w, strategy=strategy)), x, w
  )
  assert got and set(got) == {"HIGHEST"}


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("b", [16, 512])
def test_the_kernel_gradient_states_highest_on_every_path(backend, b):
  """The CPU path correlates chunks of rfft spectra; elsewhere DFT matmuls up to b = 256, FFTs
  beyond."""
  x, w = _arrays(jnp.float32, m=1, n=1, b=b)
  g = jnp.ones((x.shape[0], b))
  got = dot_precisions(lambda x, g, w: _kernel_grad.kernel_grad(x, g, w, backend=backend), x, g, w)
  assert got and set(got) == {"HIGHEST"}


def test_mixed_adapters_state_highest():
  x, w = _arrays(jnp.float32)
  stacked = jnp.stack([w, 2 * w])
  index = jnp.array([1, -1, 0, 1])
  rows = x.reshape(4, 10, -1)
  got = dot_precisions(fwd_bwd(lambda x, w: ops.mixed_matmul(x, w, index)), rows, stacked)
  assert got and set(got) == {"HIGHEST"}


def _linen_layers():
  return {
    "dense": (nn.Dense(24, precision=BASE), (5, 8, 32)),
    "dense_general": (nn.DenseGeneral((2, 12), precision=BASE), (5, 8, 32)),
    "einsum": (nn.Einsum((32, 2, 12), "btd,dnh->btnh", precision=BASE), (5, 8, 32)),
  }


def _adapted(layer_shape, dtype, key=0):
  layer, shape = layer_shape
  layer = layer.clone(dtype=dtype)
  x = jax.random.normal(jax.random.key(key), shape, dtype)
  params = dict(layer.init(jax.random.key(1), x)["params"])
  params["c3a_kernel"] = jax.random.normal(jax.random.key(2), (3, 4, 8)) * 0.1
  return layer, x, params


def _base_and_adapted(layer, x, params, strategy):
  """The dots of the frozen layer's gradient with respect to x, and of the adapted layer's
  with respect to x and its C3A kernel."""
  kernel = params.pop("c3a_kernel")
  frozen = lambda x: layer.apply({"params": params}, x)
  adapted = lambda x, w: c3a.intercepted(layer.apply, strategy=strategy)(
    {"params": {**params, "c3a_kernel": w}}, x
  )
  return dot_precisions(fwd_bwd(frozen), x), dot_precisions(fwd_bwd(adapted), x, kernel)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("strategy", ops.STRATEGIES)
@pytest.mark.parametrize("kind", ["dense", "dense_general", "einsum"])
def test_linen_layers_keep_the_base_precision_and_add_highest(kind, strategy, dtype):
  """The adapted layer runs its frozen product at the layer's precision and each C3A matmul at
  HIGHEST: the additive paths add HIGHEST dots to the frozen layer's own; the fold (on CPU,
  into a layer whose product is float32 there) puts the delta inside the layer's product and
  leaves only its kernel gradient at HIGHEST."""
  layer, x, params = _adapted(_linen_layers()[kind], dtype)
  base, got = _base_and_adapted(layer, x, params, strategy)
  assert set(base) == {"HIGH"}
  assert set(got) <= {"HIGH", "HIGHEST"}
  picks = (
    strategy if strategy != "auto" else ops.choose_strategy((40, 32), (3, 4, 8), with_base=True)
  )
  if picks == "fold" and ops.can_fold(dtype, precision=BASE):
    assert "HIGH" in got  # the delta inside the layer's product; its gradient may be FFTs only
  else:
    assert got.count("HIGH") == len(base) and "HIGHEST" in got


@pytest.mark.parametrize("strategy", ["auto", "fft"])
def test_nnx_layers_keep_the_base_precision_and_add_highest(strategy):
  layer = nnx.Linear(32, 24, precision=BASE, rngs=nnx.Rngs(0))
  cfg = c3a.C3AConfig(block_size=8, target_modules=".*", init_weights="gaussian")
  graph, adapter, frozen = nnx.split(c3a.attach(layer, cfg, jax.random.key(1)), c3a.C3AParam, ...)
  x = jax.random.normal(jax.random.key(2), (40, 32))

  def adapted(x, adapter):
    with c3a.intercept(strategy=strategy):
      return nnx.merge(graph, adapter, frozen)(x)

  base = dot_precisions(fwd_bwd(layer), x)
  got = dot_precisions(fwd_bwd(adapted), x, adapter)
  assert set(base) == {"HIGH"} and set(got) <= {"HIGH", "HIGHEST"}
  if strategy == "fft":
    assert got.count("HIGH") == len(base) and "HIGHEST" in got
