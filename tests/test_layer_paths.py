"""Every adapted layer kind on both of its paths, with a non-zero bias, against the definition.

A float32 layer under ``"auto"`` folds the delta into its kernel on CPU: c3a rewrites the
layer's call as ``x @ (W + delta)`` and adds the bias itself. Under ``"fft"`` the delta is added
to the layer's own output. Both are compared with float64 numpy,
``x @ (W + dense_reference(w).T) + bias``, the kernel in the layout rule's "in"-first order
flattened to ``(d_in, d_out)``; every bias is drawn non-zero, so a fold that drops it fails.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx

import c3a_jax as c3a
from c3a_jax import ops
from tests.reference import dense_reference

CFG = c3a.C3AConfig(block_size=4, target_modules=".*", init_weights="gaussian")
STRATEGIES = ("auto", "fft")  # "auto": the fold on CPU; "fft": the delta added to the output


def _conv1d():
  modeling = pytest.importorskip("transformers.models.gpt2.modeling_flax_gpt2")
  return modeling.FlaxConv1D(8)  # GPT-2's: its kernel stored (out, in)


# (layer, input shape, the number of the input's trailing axes the layer contracts)
LINEN = {
  "dense": (lambda: nn.Dense(8), (2, 6, 16), 1),
  "dense_general": (lambda: nn.DenseGeneral((2, 4), axis=(-2, -1)), (2, 6, 2, 8), 2),
  "einsum": (lambda: nn.Einsum((16, 2, 4), "BTD,DNH->BTNH"), (2, 6, 16), 1),
  "conv1d": (_conv1d, (2, 6, 16), 1),
}
NNX = {
  "linear": (lambda r: nnx.Linear(16, 8, rngs=r), (2, 6, 16), 1),
  "linear_general": (
    lambda r: nnx.LinearGeneral((2, 8), (2, 4), axis=(-2, -1), rngs=r),
    (2, 6, 2, 8),
    2,
  ),
  "einsum": (lambda r: nnx.Einsum("btd,dnh->btnh", (16, 2, 4), (2, 4), rngs=r), (2, 6, 16), 1),
}


def _counting_fold(monkeypatch) -> list:
  """Counts the calls of ``ops.fold``, so that a test knows which path it took."""
  calls, real = [], ops.fold
  monkeypatch.setattr(ops, "fold", lambda *a, **k: calls.append(1) or real(*a, **k))
  return calls


def _check(got, x, kernel, w, bias, n_in, strategy, calls):
  assert bool(calls) == (strategy == "auto" and jax.default_backend() == "cpu")
  f64 = lambda a: np.asarray(a, np.float64)
  delta = dense_reference(np.asarray(w)).T
  d_in, d_out = delta.shape
  rows = f64(x).reshape(-1, d_in)
  want = rows @ (f64(kernel).reshape(d_in, d_out) + delta) + f64(bias).reshape(d_out)
  assert not np.allclose(want, rows @ (f64(kernel).reshape(d_in, d_out) + delta), atol=1e-2)
  assert np.shape(got)[: x.ndim - n_in] == x.shape[: x.ndim - n_in]
  np.testing.assert_allclose(f64(got).reshape(-1, d_out), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", sorted(LINEN))
def test_linen_layers_fold_and_add_with_their_bias(name, strategy, monkeypatch):
  make, shape, n_in = LINEN[name]
  layer = make()
  x = jax.random.normal(jax.random.key(0), shape)
  params = layer.init(jax.random.key(1), x)["params"]
  params["bias"] = jax.random.normal(jax.random.key(3), np.shape(params["bias"]))
  forward = lambda p: layer.apply({"params": p}, x)
  adapted = c3a.attach(params, CFG, jax.random.key(2), forward=forward)
  (leaf,) = [k for k in adapted if k.startswith("c3a_kernel")]
  kernel = adapted["kernel"].T if leaf == "c3a_kernel_out_in" else adapted["kernel"]
  assert (leaf == "c3a_kernel_out_in") == (name == "conv1d")
  calls = _counting_fold(monkeypatch)
  got = jax.jit(c3a.intercepted(layer.apply, strategy=strategy))({"params": adapted}, x)
  _check(got, x, kernel, adapted[leaf], adapted["bias"], n_in, strategy, calls)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", sorted(NNX))
def test_nnx_layers_fold_and_add_with_their_bias(name, strategy, monkeypatch):
  make, shape, n_in = NNX[name]
  layer = make(nnx.Rngs(0))
  layer.bias[...] = jax.random.normal(jax.random.key(3), layer.bias.shape)
  x = jax.random.normal(jax.random.key(1), shape)
  adapted = c3a.attach(layer, CFG, jax.random.key(2))
  calls = _counting_fold(monkeypatch)
  with c3a.intercept(strategy):
    got = nnx.jit(lambda m, x: m(x))(adapted, x)
  w, bias = adapted.c3a_kernel[...], adapted.bias[...]
  _check(got, x, adapted.kernel[...], w, bias, n_in, strategy, calls)
