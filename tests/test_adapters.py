"""Many adapters over one base: mixed batches, weighted sums, hot swaps.

References: each row against its adapter run alone (values and kernel gradients), the dense
deltas for sums, and a trace counter for swaps."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import c3a_jax as c3a
from c3a_jax import ops


class Tower(nn.Module):
  """A Dense and a multi-axis DenseGeneral: both layer kinds a set of adapters must mix."""

  @nn.compact
  def __call__(self, x):
    h = nn.DenseGeneral((2, 8), name="heads")(x)  # (..., 16) -> (..., 2, 8)
    return nn.Dense(8, name="out")(jnp.tanh(h).reshape(*h.shape[:-2], 16))


MODEL = Tower()
X = jax.random.normal(jax.random.key(0), (5, 3, 16))  # 5 rows of 3 tokens
INDEX = jnp.array([0, 2, -1, 1, 0])


@pytest.fixture(scope="module")
def three():
  base = MODEL.init(jax.random.key(1), X)["params"]
  cfg = c3a.C3AConfig(block_size=4, target_modules=["heads", "out"], init_weights="gaussian")
  forward = lambda p: MODEL.apply({"params": p}, X)  # one function, traced anew by each attach
  adapters = [
    c3a.split(c3a.attach(base, cfg, jax.random.key(10 + i), forward=forward))[0] for i in range(3)
  ]
  return base, adapters


def _alone(adapter, base, x):
  return c3a.intercepted(MODEL.apply)({"params": c3a.combine(adapter, base)}, x)


def _mixed(stacked, base, x, index):
  with c3a.intercept(adapter_index=index):
    return MODEL.apply({"params": c3a.combine(stacked, base)}, x)


def test_each_row_computes_its_own_adapter_values_and_gradients(three, maybe_jit):
  base, adapters = three
  stacked = c3a.stack_adapters(dict(zip("abc", adapters, strict=True)))
  assert stacked["heads"]["c3a_kernel"].shape == (3, 4, 4, 4)  # (K, m, n, b)
  g = jax.random.normal(jax.random.key(2), (5, 3, 8))
  loss = lambda s: jnp.sum(_mixed(s, base, X, INDEX) * g)
  y = maybe_jit(lambda s: _mixed(s, base, X, INDEX))(stacked)
  grads = maybe_jit(jax.grad(loss))(stacked)
  plain = MODEL.apply({"params": base}, X)
  # The references jitted once each (eagerly they dominated this test's time).
  alone_y = jax.jit(_alone)
  alone_grad = jax.jit(
    jax.grad(lambda a, rows: jnp.sum(_alone(a, base, X) * g * rows[:, None, None]))
  )
  for r, k in enumerate(INDEX.tolist()):
    want = plain[r] if k < 0 else alone_y(adapters[k], base, X)[r]
    np.testing.assert_allclose(y[r], want, atol=2e-5)
  for k, adapter in enumerate(adapters):
    alone = alone_grad(adapter, jnp.equal(INDEX, k))  # slot k's gradient: its rows alone
    for layer in ("heads", "out"):
      np.testing.assert_allclose(
        grads[layer]["c3a_kernel"][k], alone[layer]["c3a_kernel"], atol=2e-5
      )


def test_nnx_models_stack_into_one_that_mixes_rows():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
      return self.fc(x)

  base = Net(nnx.Rngs(0))
  cfg = c3a.C3AConfig(block_size=4, target_modules=["fc"], init_weights="gaussian")
  a, b = (c3a.attach(base, cfg, jax.random.key(i)) for i in (1, 2))
  both = c3a.stack_adapters({"a": a, "b": b})
  assert both.fc.c3a_kernel.shape == (2, 2, 4, 4) and a.fc.c3a_kernel.shape == (2, 4, 4)
  x = X[:3, 0]
  with c3a.intercept(adapter_index=jnp.array([1, -1, 0])):
    y = nnx.jit(lambda m, x: m(x))(both, x)
  np.testing.assert_allclose(y[0], b(x)[0], atol=2e-5)
  np.testing.assert_allclose(y[1], base(x)[1], atol=1e-6)
  np.testing.assert_allclose(y[2], a(x)[2], atol=2e-5)
  with pytest.raises(ValueError, match=r"set of adapters .* c3a.intercept\(adapter_index"):
    both(x)  # a set without saying which row takes which


def test_weighted_sum_is_exactly_the_weighted_sum_of_deltas(three):
  _, adapters = three
  weights = (0.5, -2.0, 1.25)
  summed = c3a.weighted_sum(
    {name: (a, w) for name, a, w in zip("abc", adapters, weights, strict=True)}
  )
  for layer in ("heads", "out"):
    want = sum(
      w * np.asarray(ops.delta_weight(a[layer]["c3a_kernel"]), np.float64)
      for a, w in zip(adapters, weights, strict=True)
    )
    got = np.asarray(ops.delta_weight(summed[layer]["c3a_kernel"]), np.float64)
    np.testing.assert_allclose(got, want, atol=1e-6)
  # A layer one adapter leaves out adds nothing from it.
  only_out = {"out": adapters[0]["out"]}
  half = c3a.weighted_sum({"a": (only_out, 2.0), "b": (adapters[1], 1.0)})
  np.testing.assert_allclose(half["heads"]["c3a_kernel"], adapters[1]["heads"]["c3a_kernel"])


def test_what_cannot_mix_is_refused(three):
  base, adapters = three
  other = c3a.split(
    c3a.attach(
      base,
      c3a.C3AConfig(block_size=8, target_modules=["out"]),
      jax.random.key(5),
    )
  )[0]
  with pytest.raises(ValueError, match=r"layer 'out' has C3A kernels of different shapes"):
    c3a.weighted_sum({"a": (adapters[0], 1.0), "b": (other, 1.0)})
  head = {**adapters[0], "out": {**adapters[0]["out"], "bias": jnp.zeros(8)}}
  with pytest.raises(ValueError, match=r"adapter 'h' holds out.bias, which is not a C3A kernel"):
    c3a.stack_adapters({"a": adapters[1], "h": head})
  stacked = c3a.combine(c3a.stack_adapters({"a": adapters[0], "b": adapters[1]}), base)
  with pytest.raises(ValueError, match=r"is a set of 2 adapters .*merge takes one adapter"):
    c3a.merge(stacked)
  with pytest.raises(ValueError, match=r"adapter_index holds \[2\]; valid: -1 to 1"):
    _mixed(stacked, base, X, jnp.array([0, 1, 2, -1, 0]))
  with pytest.raises(ValueError, match=r"names 4 rows, but the layer's input has 5"):
    _mixed(stacked, base, X, jnp.array([0, 1, 1, 0]))
  y = jax.jit(lambda i: _mixed(stacked, base, X, i))(jnp.array([0, 1, 7, -1, 0]))
  assert np.isnan(y[2]).all() and np.isfinite(np.delete(y, 2, axis=0)).all()  # jit: NaN, not wrong


def test_a_jitted_step_takes_any_adapter_and_a_slot_swaps_in_place(three):
  base, adapters = three
  traces = []

  @jax.jit
  def run(adapter, x):
    traces.append(1)
    return _alone(adapter, base, x)

  for a in adapters:
    np.testing.assert_allclose(run(a, X), _alone(a, base, X), atol=1e-6)
  assert len(traces) == 1  # switching adapters of one shape never retraces

  stacked = c3a.stack_adapters({"a": adapters[0], "b": adapters[1]})
  swapped = c3a.replace_slot(stacked, 1, adapters[2])
  np.testing.assert_array_equal(swapped["out"]["c3a_kernel"][1], adapters[2]["out"]["c3a_kernel"])
  np.testing.assert_array_equal(swapped["out"]["c3a_kernel"][0], adapters[0]["out"]["c3a_kernel"])
  with pytest.raises(ValueError, match="slot 2 is not one of the set's 2 slots"):
    c3a.replace_slot(stacked, 2, adapters[2])
  with pytest.raises(
    ValueError, match=r"layer 'heads' holds one C3A kernel \(4, 4, 4\), not a set"
  ):
    c3a.replace_slot(adapters[0], 0, adapters[2])


def test_the_cli_evaluates_a_set_of_adapters_as_each_alone():
  from c3a_jax.cli import runner
  from c3a_jax.cli.job import Job

  dense = nn.Dense(4)
  x = np.asarray(jax.random.normal(jax.random.key(3), (7, 16)))
  base = {"fc": dense.init(jax.random.key(4), x)["params"]}
  cfg = c3a.C3AConfig(block_size=4, target_modules=["fc"], init_weights="gaussian")
  adapters = [_loud(c3a.split(c3a.attach(base, cfg, jax.random.key(i)))[0]) for i in (5, 6)]
  labels = np.array([0, 1, 2, 0, 1, 2, 0])
  job = Job(
    logits_fn=lambda p, b, rng, train: dense.apply({"params": p["fc"]}, b["x"]),
    params=base,
    train_data={"x": x, "labels": labels},
    eval_data={"x": x, "labels": labels},
  )
  mixed = runner.evaluate_mixed(
    job, c3a.combine(c3a.stack_adapters(dict(a=adapters[0], b=adapters[1])), base), 2, 4
  )
  for got, adapter in zip(mixed, adapters, strict=True):
    want = runner.evaluate(job, c3a.combine(adapter, base), 4)
    assert got == pytest.approx(want, rel=1e-5)
  assert mixed[0] != pytest.approx(mixed[1])


def _loud(adapter):
  return jax.tree.map(lambda w: w * 100.0, adapter)


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return jnp.tanh(nn.Dense(16, name="fc")(x)), None


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    scan = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return scan(name="layers")(x, None)[0]


def test_a_set_over_a_scanned_stack_keeps_the_layer_axis_first():
  model = _Scanned()
  x = X[:4, :, :16]
  base = model.init(jax.random.key(7), x)["params"]
  cfg = c3a.C3AConfig(block_size=4, target_modules=["fc"], init_weights="gaussian")
  forward = lambda p: model.apply({"params": p}, x)
  a, b = (
    _loud(c3a.split(c3a.attach(base, cfg, jax.random.key(i), forward=forward))[0]) for i in (8, 9)
  )
  both = c3a.combine(c3a.stack_adapters({"a": a, "b": b}), base)
  assert both["layers"]["fc"]["c3a_kernel"].shape == (3, 2, 4, 4, 4)  # (L, K, m, n, b)
  index = jnp.array([1, 0, -1, 1])
  with c3a.intercept(adapter_index=index):
    y = jax.jit(model.apply)({"params": both}, x)
  run = jax.jit(c3a.intercepted(model.apply))
  alone = [run({"params": c3a.combine(ad, base)}, x) for ad in (a, b)]
  plain = model.apply({"params": base}, x)
  assert not np.allclose(alone[0], alone[1], atol=1e-3)
  for r, k in enumerate(index.tolist()):  # three layers deep: float32 order effects grow
    np.testing.assert_allclose(y[r], (plain if k < 0 else alone[k])[r], atol=2e-4)


def test_a_set_over_an_nnx_scan_stack():
  from tests.test_nnx import linear_stack
  from tests.test_nnx import run_stack as run

  stack = linear_stack()
  cfg = c3a.C3AConfig(block_size=4, target_modules=".*", init_weights="gaussian")
  a, b = (c3a.attach(stack, cfg, jax.random.key(i)) for i in (1, 2))
  both = c3a.stack_adapters({"a": a, "b": b})
  assert both.c3a_kernel.shape == (3, 2, 4, 4, 4)  # (L, K, m, n, b): nnx.scan slices L

  x = X[:3, 0]
  index = jnp.array([1, -1, 0])
  with c3a.intercept(adapter_index=index):
    y = run(both, x)
  alone = [run(m, x) for m in (a, b)]
  plain = run(stack, x)
  assert not np.allclose(alone[0], alone[1], atol=1e-3)
  for r, k in enumerate(index.tolist()):
    np.testing.assert_allclose(y[r], (plain if k < 0 else alone[k])[r], atol=2e-5)


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), "heavy", None])
def test_weighted_sum_refuses_a_weight_that_is_not_a_finite_number(three, weight):
  _, adapters = three
  with pytest.raises((ValueError, TypeError), match=r"weighted_sum: adapter 'b' has weight "):
    c3a.weighted_sum({"a": (adapters[0], 1.0), "b": (adapters[1], weight)})


def test_weighted_sum_refuses_a_sum_that_overflows(three):
  _, adapters = three
  with pytest.raises(ValueError, match=r"weighted_sum: layer '(heads|out)'.* not finite"):
    c3a.weighted_sum({"a": (adapters[0], 1e39), "b": (adapters[1], 1.0)})


def test_a_set_of_adapters_sets_into_an_nnx_model_as_a_params_tree():
  """set_nnx_params takes a set (the command's mixed-batch eval on Tunix models does), and each
  row computes its own adapter's output."""

  cfg = c3a.C3AConfig(block_size=8, target_modules=".*", init_weights="gaussian")
  one, two = (
    c3a.attach(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), cfg, jax.random.key(k)) for k in (1, 2)
  )
  kernels = {
    n: {"c3a_kernel": c3a.nnx_params(m)["c3a_kernel"]} for n, m in (("a", one), ("b", two))
  }
  model = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
  c3a.set_nnx_params(model, c3a.stack_adapters(kernels))
  x = jax.random.normal(jax.random.key(3), (2, 16))
  with c3a.intercept(adapter_index=jnp.array([0, 1])):
    mixed = model(x)
  np.testing.assert_allclose(mixed, jnp.stack([one(x)[0], two(x)[1]]), atol=1e-5)
  assert not np.allclose(mixed[0], two(x)[0], atol=1e-3)
