"""Training steps: split vs one tree, accumulation, mixed precision, pmap and sharded jit on 8
host CPU devices (conftest sets XLA_FLAGS; tests/backend.py hands them out on any backend)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import c3a_jax as c3a
from tests import backend, toy

# Reductions over devices add in another order than on one device: float32 rounding only.
TOL = dict(rtol=2e-5, atol=2e-6)
STEPS = 4


def run_single(steps=STEPS, grad_accum=1, compute_dtype=None, batch=None, loss_fn=None):
  adapter, base = c3a.split(toy.params(), toy.CFG)
  tx = toy.tx()
  loss_fn = toy.loss_fn() if loss_fn is None else loss_fn
  step = jax.jit(
    c3a.make_train_step(loss_fn, tx, grad_accum=grad_accum, compute_dtype=compute_dtype)
  )
  state = c3a.TrainState.create(adapter, tx, rng=0)
  batch = toy.data(32) if batch is None else batch
  losses = []
  for _ in range(steps):
    state, metrics = step(state, base, batch)
    losses.append(float(metrics["loss"]))
  return state, losses


def assert_trees_close(a, b, **tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol), a, b)


def test_single_device_training_learns_and_touches_only_the_adapter():
  state, losses = run_single(steps=8)
  assert losses[-1] < losses[0]
  assert int(state.step) == 8
  adapter, _ = c3a.split(toy.params(), toy.CFG)
  assert jax.tree.structure(state.params) == jax.tree.structure(adapter)


@pytest.mark.integration
def test_one_tree_pattern_equals_split_pattern():
  tx = toy.tx()
  step = jax.jit(c3a.make_train_step(toy.loss_fn(), tx))
  state = c3a.TrainState.create(toy.params(), tx, rng=0)
  for _ in range(STEPS):
    state, _ = step(state, None, toy.data(32))
  split_state, _ = run_single()
  trained, frozen = c3a.split(state.params, toy.CFG)
  assert_trees_close(trained, split_state.params, **TOL)
  _, base = c3a.split(toy.params(), toy.CFG)
  jax.tree.map(np.testing.assert_array_equal, frozen, base)  # frozen leaves never move


def test_grad_accumulation_equals_the_full_batch():
  full, _ = run_single(grad_accum=1)
  accum, _ = run_single(grad_accum=4)
  assert_trees_close(full.params, accum.params, **TOL)
  with pytest.raises(
    ValueError,
    match=r"grad_accum=3 does not divide batch leaf \['x'\] of "
    r"shape \(32, 16\)",
  ):
    run_single(grad_accum=3)
  with pytest.raises(ValueError, match="grad_accum must be a positive integer"):
    c3a.make_train_step(toy.loss_fn(), toy.tx(), grad_accum=0)


def dtypes(tree):
  """Each leaf's dtype by its path (as keystr writes it)."""
  return {
    jax.tree_util.keystr(p): x.dtype for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def recording_loss(seen):
  """toy's loss, noting the dtype of each params leaf it is given (once, when the step traces)."""
  loss = toy.loss_fn()

  def record(params, batch, rng):
    seen.update(dtypes(params))
    return loss(params, batch, rng)

  return record


def test_mixed_precision_casts_the_frozen_base_and_keeps_c3a_float32():
  # What compute_dtype promises: the model is given the frozen leaves in bfloat16, the trained
  # ones (C3A kernels, the saved head) in float32. Whether XLA then runs the bfloat16 base in
  # bfloat16 is its choice (its GPU pipeline folds the f32->bf16->f32 round trip away).
  seen = {}
  state, losses = run_single(compute_dtype=jnp.bfloat16, loss_fn=recording_loss(seen))
  adapter, base = c3a.split(toy.params(), toy.CFG)
  bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
  assert seen == {**dict.fromkeys(dtypes(base), bf16), **dict.fromkeys(dtypes(adapter), f32)}
  assert seen["['fc0']['kernel']"] == bf16 and seen["['fc0']['c3a_kernel']"] == f32
  trained = jax.tree.leaves((state.params, state.opt_state))
  assert {x.dtype for x in trained if jnp.issubdtype(x.dtype, jnp.floating)} == {f32}
  _, ref_losses = run_single()
  assert losses[-1] < losses[0]
  np.testing.assert_allclose(losses, ref_losses, rtol=3e-2)  # a bf16 base: close, maybe equal


def test_cast_frozen_casts_floating_leaves_but_c3a_kernels():
  tree = {
    "fc": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4), "c3a_kernel": jnp.ones((1, 1, 4))},
    "embed": {"ids": jnp.arange(3)},
  }
  cast = c3a.training.cast_frozen(tree, jnp.bfloat16)
  assert cast["fc"]["kernel"].dtype == cast["fc"]["bias"].dtype == jnp.bfloat16
  assert cast["fc"]["c3a_kernel"].dtype == jnp.float32  # C3A kernels always train in float32
  assert cast["embed"]["ids"].dtype == tree["embed"]["ids"].dtype  # integers untouched


def test_batch_sharding_splits_the_batch_over_every_mesh_axis():
  mesh = backend.cpu_mesh(data=2, fsdp=4)
  sharding = c3a.training.batch_sharding(mesh)
  x = jax.device_put(np.zeros((16, 3), np.float32), sharding)
  assert {s.data.shape for s in x.addressable_shards} == {(2, 3)}  # 16 rows over 8 devices


def test_dropout_rng_advances_and_differs_per_step():
  model = toy.MLP(dropout=0.5)
  adapter, base = c3a.split(toy.params(), toy.CFG)
  tx = toy.tx()
  step = jax.jit(c3a.make_train_step(toy.loss_fn(model), tx))
  state = c3a.TrainState.create(adapter, tx, rng=0)
  batch = toy.data(32)
  s1, m1 = step(state, base, batch)
  _, m1b = step(state, base, batch)
  assert float(m1["loss"]) == float(m1b["loss"])  # same state, same key: deterministic
  assert not np.array_equal(s1.rng, state.rng)
  _, m2 = step(s1.replace(params=state.params, opt_state=state.opt_state), base, batch)
  assert float(m2["loss"]) != float(m1["loss"])  # new key, new dropout mask


@pytest.mark.integration  # sharded jit (below) is the default tier's multi-device check
def test_pmap_equals_single_device():
  n = 8
  adapter, base = c3a.split(toy.params(), toy.CFG)
  tx = toy.tx()
  step = jax.pmap(
    c3a.make_train_step(toy.loss_fn(), tx, axis_name="data"),
    axis_name="data",
    in_axes=(0, None, 0),
    devices=backend.cpu_devices(n),
  )
  state = jax.tree.map(
    lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))), c3a.TrainState.create(adapter, tx, rng=0)
  )
  batch = jax.tree.map(lambda x: x.reshape(n, -1, *x.shape[1:]), toy.data(32))
  for _ in range(STEPS):
    state, metrics = step(state, base, batch)
  with backend.on_one_cpu():
    ref, ref_losses = run_single()
  assert_trees_close(jax.tree.map(lambda x: x[0], state.params), ref.params, **TOL)
  np.testing.assert_allclose(metrics["loss"][0], ref_losses[-1], rtol=1e-5)


@pytest.mark.parametrize(
  "data,fsdp,shard_base",
  [
    pytest.param(8, 1, False, marks=pytest.mark.integration),
    pytest.param(4, 2, True, marks=pytest.mark.integration),
    (2, 4, True),
  ],
)
def test_sharded_jit_equals_single_device(data, fsdp, shard_base):
  mesh = backend.cpu_mesh(data=data, fsdp=fsdp)
  adapter, base = c3a.split(toy.params(), toy.CFG)
  tx = toy.tx()
  state = c3a.TrainState.create(adapter, tx, rng=0)
  state_sh = c3a.training.param_shardings(state, mesh)
  base_sh = c3a.training.param_shardings(base, mesh, fsdp=shard_base)
  state, base = jax.device_put(state, state_sh), jax.device_put(base, base_sh)
  step = jax.jit(
    c3a.make_train_step(toy.loss_fn(), tx), out_shardings=(state_sh, None), donate_argnums=0
  )
  batch = c3a.training.shard_batch(toy.data(32), mesh)
  assert batch["x"].sharding.spec == P(("data", "fsdp"))
  for _ in range(STEPS):
    state, metrics = step(state, base, batch)
  with backend.on_one_cpu():
    ref, ref_losses = run_single()
  assert_trees_close(state.params, ref.params, **TOL)
  np.testing.assert_allclose(float(metrics["loss"]), ref_losses[-1], rtol=1e-5)
  # The optimizer state's moments sit where their parameters sit.
  kernel_spec = state.params["fc0"]["c3a_kernel"].sharding.spec
  assert kernel_spec == (P("fsdp") if fsdp > 1 else P())
  mu = state.opt_state.inner_states["c3a"].inner_state[0].mu["fc0"]["c3a_kernel"]
  assert mu.sharding.spec == kernel_spec


def test_sharding_rule():
  mesh = backend.cpu_mesh(data=2, fsdp=4)
  tree = {
    "a": {"kernel": np.zeros((16, 6)), "bias": np.zeros(6), "c3a_kernel": np.zeros((4, 2, 8))},
    "b": {"kernel": np.zeros((3, 5)), "c3a_kernel": np.zeros((2, 2, 8))},
    "emb": {"embedding": np.zeros((6, 32))},
  }
  specs = jax.tree.map(lambda s: s.spec, c3a.training.param_shardings(tree, mesh))
  assert specs["a"]["c3a_kernel"] == P("fsdp")  # m = 4 divides over fsdp = 4
  assert specs["b"]["c3a_kernel"] == P()  # m = 2 does not: replicated
  assert specs["a"]["kernel"] == P("fsdp", None)  # the largest axis that divides
  assert specs["emb"]["embedding"] == P(None, "fsdp")
  assert specs["a"]["bias"] == P() and specs["b"]["kernel"] == P()
  no_fsdp = jax.tree.map(lambda s: s.spec, c3a.training.param_shardings(tree, mesh, fsdp=False))
  assert no_fsdp["a"]["kernel"] == P() and no_fsdp["a"]["c3a_kernel"] == P("fsdp")


def test_bad_meshes_and_batches_are_clear_errors():
  eight = backend.cpu_devices(8)
  with pytest.raises(ValueError, match=r"data=3 x fsdp=2 must equal the number of devices \(8\)"):
    c3a.training.make_mesh(data=3, fsdp=2, devices=eight)
  with pytest.raises(ValueError, match="fsdp=3 does not divide the 8 devices"):
    c3a.training.make_mesh(fsdp=3, devices=eight)
  odd = Mesh(np.asarray(eight).reshape(2, 4), ("data", "model"))
  with pytest.raises(ValueError, match=r"mesh axes \['model'\] are not known"):
    c3a.training.param_shardings({"k": np.zeros(4)}, odd)
  with pytest.raises(
    ValueError,
    match=r"batch leaf \['x'\] has leading size 12, which does not "
    r"divide over the 8 shards",
  ):
    c3a.training.shard_batch({"x": np.zeros((12, 4))}, backend.cpu_mesh(data=8))


def test_compiled_memory_and_throughput():
  adapter, base = c3a.split(toy.params(), toy.CFG)
  tx = toy.tx()
  step = jax.jit(c3a.make_train_step(toy.loss_fn(), tx))
  state = c3a.TrainState.create(adapter, tx)
  memory = c3a.training.compiled_memory(step, state, base, toy.data(32))
  args = sum(np.asarray(x).nbytes for x in jax.tree.leaves((state, base, toy.data(32))))
  assert 0.9 * args <= memory["argument"] <= args  # XLA may drop unused inputs
  assert memory["peak"] >= memory["argument"] and memory["temp"] > 0
  meter = c3a.training.Throughput(window=3)
  for _ in range(5):
    with meter.measure(tokens=32):
      state, metrics = step(state, base, toy.data(32))
      jax.block_until_ready(metrics)
  assert meter.steps == 3 and meter.step_time > 0
  assert meter.tokens_per_s == pytest.approx(32 / meter.step_time, rel=1.0)


@pytest.mark.integration
def test_remat_model_trains_like_the_plain_one():
  import flax.linen as nn

  class RematMLP(toy.MLP):
    @nn.compact
    def __call__(self, x, *, rng=None):
      block = nn.remat(
        lambda mdl, h, name: nn.gelu(nn.Dense(toy.HIDDEN, name=name)(h)), static_argnums=(2,)
      )
      return nn.Dense(toy.CLASSES, name="head")(block(self, block(self, x, "fc0"), "fc1"))

  adapter, base = c3a.split(toy.params(), toy.CFG)
  tx = toy.tx()
  step = jax.jit(c3a.make_train_step(toy.loss_fn(RematMLP()), tx))
  state = c3a.TrainState.create(adapter, tx, rng=0)
  for _ in range(STEPS):
    state, _ = step(state, base, toy.data(32))
  ref, _ = run_single()
  assert_trees_close(state.params, ref.params, **TOL)
