"""attach, split, combine, merge, unmerge: pure functions of the params tree."""

import warnings

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import c3a_jax as c3a
from c3a_jax import ops
from tests.reference import dense_reference


class MLP(nn.Module):
  features: tuple[int, ...]

  @nn.compact
  def __call__(self, x):
    for i, f in enumerate(self.features):
      x = nn.Dense(f, name=f"fc{i}")(x)
      if i < len(self.features) - 1:
        x = nn.gelu(x)
    return x


def mlp_params(d_in, features, seed=0):
  model = MLP(tuple(features))
  return model, model.init(jax.random.key(seed), jnp.ones((1, d_in)))["params"]


def test_attach_is_pure_and_shapes_are_peft_shapes():
  _, params = mlp_params(16, (32, 8))
  cfg = c3a.C3AConfig(block_size=8, target_modules=["fc0", "fc1"])
  before = jax.tree.map(np.asarray, params)
  out = c3a.attach(params, cfg, jax.random.key(1))
  assert out["fc0"]["c3a_kernel"].shape == (4, 2, 8)  # (d_out/b, d_in/b, b)
  assert out["fc1"]["c3a_kernel"].shape == (1, 4, 8)
  assert "c3a_kernel" not in params["fc0"]  # input untouched
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, params))
  assert out["fc0"]["kernel"] is params["fc0"]["kernel"]


def test_attach_init_is_per_layer_and_deterministic():
  _, params = mlp_params(16, (16, 16))
  cfg = c3a.C3AConfig(block_size=8, target_modules=["fc0", "fc1"])
  a = c3a.attach(params, cfg, jax.random.key(1))
  b = c3a.attach(params, cfg.replace(target_modules=["fc1"]), jax.random.key(1))
  np.testing.assert_array_equal(a["fc1"]["c3a_kernel"], b["fc1"]["c3a_kernel"])
  assert not np.allclose(a["fc0"]["c3a_kernel"], a["fc1"]["c3a_kernel"])
  zero = c3a.attach(params, cfg.replace(init_weights=True), jax.random.key(1))
  assert not np.asarray(zero["fc0"]["c3a_kernel"]).any()


def test_attach_accepts_frozendict_and_refuses_double_attach():
  _, params = mlp_params(8, (8,))
  cfg = c3a.C3AConfig(block_size=4, target_modules=["fc0"])
  out = c3a.attach(flax.core.freeze(params), cfg, jax.random.key(0))
  assert isinstance(out, dict) and "c3a_kernel" in out["fc0"]
  with pytest.raises(ValueError, match="'fc0' already holds a C3A kernel"):
    c3a.attach(out, cfg, jax.random.key(0))


def test_merge_matches_dense_reference_and_interceptor(maybe_jit):
  model, params = mlp_params(16, (24, 8))
  cfg = c3a.C3AConfig(block_size=8, target_modules=["fc0", "fc1"], init_weights="gaussian")
  params = c3a.attach(params, cfg, jax.random.key(1))
  merged = c3a.merge(params)
  assert "c3a_kernel" not in merged["fc0"] and "c3a_kernel" in params["fc0"]
  w = np.asarray(params["fc0"]["c3a_kernel"], np.float64)
  np.testing.assert_allclose(
    merged["fc0"]["kernel"],
    np.asarray(params["fc0"]["kernel"]) + dense_reference(w).T,
    rtol=1e-5,
    atol=1e-6,
  )
  x = jax.random.normal(jax.random.key(2), (4, 16))
  adapted = maybe_jit(c3a.intercepted(model.apply))({"params": params}, x)
  base = model.apply({"params": params}, x)  # unwrapped: the extra leaf is ignored
  np.testing.assert_allclose(adapted, model.apply({"params": merged}, x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(base, model.apply({"params": c3a.split(params)[1]}, x))
  assert np.abs(adapted - base).max() > 1e-2


def test_merge_keeps_dtype_and_computes_in_float32():
  kernel = jnp.full((8, 8), 1.0, jnp.bfloat16)
  w = jnp.full((2, 2, 4), 1e-3, jnp.float32)
  with pytest.warns(UserWarning, match=r"'fc', 100%"):  # 1 + 1e-3 / 8 is 1 in bfloat16
    merged = c3a.merge({"fc": {"kernel": kernel, "c3a_kernel": w}})
  assert merged["fc"]["kernel"].dtype == jnp.bfloat16
  ref = (np.float32(1.0) + np.asarray(ops.delta_weight(w))).astype(jnp.bfloat16)
  np.testing.assert_array_equal(merged["fc"]["kernel"], ref)


def test_safe_merge_names_the_layer():
  params = {"enc": {"fc": {"kernel": jnp.ones((8, 8)), "c3a_kernel": jnp.ones((2, 2, 4))}}}
  assert np.isfinite(c3a.merge(params, safe=True)["enc"]["fc"]["kernel"]).all()
  params["enc"]["fc"]["c3a_kernel"] = params["enc"]["fc"]["c3a_kernel"].at[0, 0, 0].set(jnp.nan)
  with pytest.raises(
    ValueError,
    match=r"layer 'enc.fc' would get non-finite weights; its C3A kernel holds 1 non-finite "
    r"values, its base kernel 0",
  ):
    c3a.merge(params, safe=True)
  assert np.isnan(c3a.merge(params)["enc"]["fc"]["kernel"]).any()  # unsafe merge goes through
  # A NaN in the base kernel is named as such.
  params["enc"]["fc"]["c3a_kernel"] = jnp.ones((2, 2, 4))
  params["enc"]["fc"]["kernel"] = params["enc"]["fc"]["kernel"].at[1, 2].set(jnp.inf)
  with pytest.raises(ValueError, match=r"C3A kernel holds 0 non-finite values, its base kernel 1"):
    c3a.merge(params, safe=True)


@pytest.mark.parametrize("params", [None, [1, 2], "fc"])
def test_attach_wants_a_mapping(params):
  cfg = c3a.C3AConfig(block_size=4, target_modules=["fc"])
  with pytest.raises(TypeError, match=r"attach: params must be a Flax params tree.*got "):
    c3a.attach(params, cfg, jax.random.key(0))


def test_split_and_combine_round_trip_with_config():
  _, params = mlp_params(16, (16, 4))
  params = {"body": params, "classifier": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}
  cfg = c3a.C3AConfig(
    block_size=8, target_modules=["fc0"], modules_to_save=["classifier"], bias="c3a_only"
  )
  params = c3a.attach(params, cfg, jax.random.key(0))
  adapter, base = c3a.split(params, cfg)
  assert sorted(adapter["body"]["fc0"]) == ["bias", "c3a_kernel"]
  assert sorted(adapter["classifier"]) == ["bias", "kernel"]
  assert base["classifier"] == {} and sorted(base["body"]["fc0"]) == ["kernel"]
  assert jax.tree.structure(c3a.combine(adapter, base)) == jax.tree.structure(params)
  only_c3a, _ = c3a.split(params)
  assert jax.tree.leaves(only_c3a) == [params["body"]["fc0"]["c3a_kernel"]]
  combined = jax.jit(c3a.combine)(adapter, base)
  jax.tree.map(np.testing.assert_array_equal, combined, params)


def test_combine_rejects_trees_that_do_not_fit():
  base = {"enc": {"fc": {"kernel": jnp.ones((16, 8))}}}
  with pytest.raises(ValueError, match=r"adapter leaf dec.fc.c3a_kernel .* no module 'dec'"):
    c3a.combine({"dec": {"fc": {"c3a_kernel": jnp.ones((1, 2, 8))}}}, base)
  with pytest.raises(
    ValueError,
    match=r"enc.fc.c3a_kernel has shape \(2, 1, 8\) \(\*stack, m, n, b\), "
    r"for a layer with d_in=8 and d_out=16 .* kernel \(16, 8\)",
  ):
    c3a.combine({"enc": {"fc": {"c3a_kernel": jnp.ones((2, 1, 8))}}}, base)
  with pytest.raises(ValueError, match=r"enc.fc.kernel has shape \(8, 8\), the base's has"):
    c3a.combine({"enc": {"fc": {"kernel": jnp.ones((8, 8))}}}, base)
  with pytest.raises(ValueError, match="needs a layer with a kernel"):
    c3a.combine({"enc": {"c3a_kernel": jnp.ones((1, 2, 8))}}, base)
  fitted = c3a.combine({"enc": {"fc": {"c3a_kernel": jnp.ones((1, 2, 8))}}}, base)
  assert fitted["enc"]["fc"]["c3a_kernel"].shape == (1, 2, 8)


def test_unmerge_errors():
  params = {"fc": {"kernel": jnp.ones((8, 8)), "c3a_kernel": jnp.ones((2, 2, 4))}}
  adapter, _ = c3a.split(params)
  with pytest.raises(ValueError, match="'fc' still holds a C3A kernel"):
    c3a.unmerge(params, adapter)
  with pytest.raises(ValueError, match="no layer 'other'"):
    c3a.unmerge(c3a.merge(params), {"other": adapter["fc"]})


@st.composite
def layer_and_block(draw):
  b = draw(st.integers(1, 9))
  n, m = draw(st.integers(1, 4)), draw(st.integers(1, 4))
  return n * b, m * b, b, draw(st.integers(0, 2**16))


@pytest.mark.integration
@given(layer_and_block())
def test_property_attach_then_wrap_equals_merge(case):
  d_in, d_out, b, seed = case
  model = nn.Dense(d_out)
  params = {"fc": model.init(jax.random.key(seed), jnp.ones((1, d_in)))["params"]}
  cfg = c3a.C3AConfig(block_size=b, target_modules=["fc"], init_weights="gaussian")
  params = c3a.attach(params, cfg, jax.random.key(seed + 1))
  x = jax.random.normal(jax.random.key(seed + 2), (3, d_in))
  # Eager: a compilation per drawn example would cost more than the example.
  y = c3a.intercepted(model.apply)({"params": params["fc"]}, x)
  ym = model.apply({"params": c3a.merge(params)["fc"]}, x)
  scale = 1 + float(jnp.abs(ym).max())
  np.testing.assert_allclose(y, ym, atol=2e-6 * scale * d_in**0.5, rtol=1e-5)


@pytest.mark.integration
@given(layer_and_block(), st.sampled_from([jnp.float32, jnp.bfloat16]))
def test_property_merge_then_unmerge_restores(case, dtype):
  d_in, d_out, b, seed = case
  kernel = jax.random.normal(jax.random.key(seed), (d_in, d_out)).astype(dtype)
  params = {"fc": {"kernel": kernel, "bias": jnp.zeros(d_out)}}
  cfg = c3a.C3AConfig(block_size=b, target_modules=["fc"])
  params = c3a.attach(params, cfg, jax.random.key(seed + 1))
  adapter, _ = c3a.split(params)
  with warnings.catch_warnings():  # bf16 rounds part of the delta away: tolerated below
    warnings.filterwarnings("ignore", "merge: .* lose more than", UserWarning)
    restored = c3a.unmerge(c3a.merge(params), adapter)
  assert jax.tree.structure(restored) == jax.tree.structure(params)
  assert restored["fc"]["kernel"].dtype == dtype
  tol = 1e-6 if dtype == jnp.float32 else 1e-2  # bf16: one rounding each way
  np.testing.assert_allclose(
    np.asarray(restored["fc"]["kernel"], np.float32),
    np.asarray(kernel, np.float32),
    atol=tol * 4,
    rtol=tol,
  )
  np.testing.assert_array_equal(restored["fc"]["c3a_kernel"], params["fc"]["c3a_kernel"])


def test_nested_interceptors_add_the_delta_once():
  model, params = mlp_params(8, (8,))
  params = c3a.attach(
    params,
    c3a.C3AConfig(block_size=4, target_modules=["fc0"], init_weights="gaussian"),
    jax.random.key(1),
  )
  x = jnp.ones((2, 8))
  once = c3a.intercepted(model.apply)({"params": params}, x)
  with c3a.intercept():
    twice = jax.jit(c3a.intercepted(model.apply))({"params": params}, x)
  np.testing.assert_allclose(twice, once, rtol=1e-6)
  np.testing.assert_allclose(once, model.apply({"params": c3a.merge(params)}, x), atol=1e-5)


def test_a_c3a_kernel_on_a_layer_the_interceptor_cannot_adapt_is_an_error():
  model = nn.DenseGeneral(8, batch_dims=(0,))
  params = dict(model.init(jax.random.key(0), jnp.ones((2, 8)))["params"])
  params["c3a_kernel"] = jnp.ones((2, 2, 4))
  with pytest.raises(ValueError, match=r"holds a C3A kernel, but: DenseGeneral with batch_dims"):
    c3a.intercepted(model.apply)({"params": params}, jnp.ones((2, 8)))


def test_root_level_dense_and_bad_keys():
  model = nn.Dense(8)
  params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
  cfg = c3a.C3AConfig(block_size=4, target_modules="all-linear", init_weights="gaussian")
  adapted = c3a.attach(params, cfg, jax.random.key(1))
  assert adapted["c3a_kernel"].shape == (2, 2, 4)
  x = jnp.ones((2, 8))
  np.testing.assert_allclose(
    c3a.intercepted(model.apply)({"params": adapted}, x),
    model.apply({"params": c3a.merge(adapted)}, x),
    atol=1e-5,
  )
  with pytest.raises(ValueError, match=r"params key 0 under 'layers.': c3a_jax needs string keys"):
    c3a.attach({"layers": {0: {"kernel": jnp.ones((8, 8))}}}, cfg, jax.random.key(0))
  with pytest.raises(ValueError, match=r"params key 'a.b'"):
    c3a.split({"a.b": {"kernel": jnp.ones((8, 8))}})


def test_combine_refuses_a_weight_named_for_another_layer_type():
  base = {"embed": {"embedding": jnp.ones((10, 8))}}
  with pytest.raises(
    ValueError,
    match=r"embed.kernel does not fit the base, whose module 'embed' "
    r"holds \['embedding'\]",
  ):
    c3a.combine({"embed": {"kernel": jnp.ones((10, 8))}}, base)


def test_safe_merge_under_jit_says_why():
  params = {"fc": {"kernel": jnp.ones((8, 8)), "c3a_kernel": jnp.ones((2, 2, 4))}}
  with pytest.raises(ValueError, match="needs concrete arrays: call it outside jax.jit"):
    jax.jit(lambda p: c3a.merge(p, safe=True))(params)


def test_a_lossy_low_precision_merge_warns_and_dtype_keeps_the_delta():
  rng = np.random.default_rng(0)
  kernel = jnp.asarray(rng.normal(size=(256, 256)), jnp.bfloat16)
  cfg = c3a.C3AConfig(block_size=64, target_modules=["fc"])  # xavier: an initial-size delta
  params = c3a.attach({"fc": {"kernel": kernel}}, cfg, jax.random.key(0))
  delta = np.asarray(ops.delta_weight(params["fc"]["c3a_kernel"]))
  with pytest.warns(
    UserWarning,
    match=r"1 layer\(s\) stored in bfloat16 lose more than 1% of "
    r"their C3A delta.*'fc'.*dtype=jnp.float32",
  ):
    lossy = c3a.merge(params)
  kept = np.asarray(lossy["fc"]["kernel"], np.float32) - np.asarray(kernel, np.float32)
  assert np.linalg.norm(kept - delta) > 0.01 * np.linalg.norm(delta)  # the warning was true
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    exact = c3a.merge(params, dtype=jnp.float32)
    c3a.merge(
      {"fc": {"kernel": kernel.astype(jnp.float32), "c3a_kernel": params["fc"]["c3a_kernel"]}}
    )
  assert exact["fc"]["kernel"].dtype == jnp.float32
  np.testing.assert_allclose(
    exact["fc"]["kernel"], np.asarray(kernel, np.float32) + delta, rtol=1e-6, atol=1e-6
  )


def test_merge_and_unmerge_keep_float64_under_x64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    kernel, w = jnp.asarray(rng.normal(size=(8, 12))), jnp.asarray(rng.normal(size=(3, 2, 4)))
    merged = c3a.merge({"fc": {"kernel": kernel, "c3a_kernel": w}})
    assert merged["fc"]["kernel"].dtype == jnp.float64
    np.testing.assert_allclose(merged["fc"]["kernel"], kernel + dense_reference(w).T, atol=1e-14)
    restored = c3a.unmerge(merged, {"fc": {"c3a_kernel": w}})
    np.testing.assert_allclose(restored["fc"]["kernel"], kernel, atol=1e-14)


def test_attach_takes_an_int_seed_as_flax_does():
  """nnx.Rngs(0) takes a seed; attach(params, cfg, 0) is attach(params, cfg, jax.random.key(0))."""
  _, params = mlp_params(16, (16, 8))
  cfg = c3a.C3AConfig(block_size=8, target_modules=["fc0", "fc1"])
  by_seed = c3a.attach(params, cfg, 3)
  by_key = c3a.attach(params, cfg, jax.random.key(3))
  jax.tree.map(np.testing.assert_array_equal, by_seed, by_key)
  jax.tree.map(np.testing.assert_array_equal, c3a.attach(params, cfg, np.int64(3)), by_key)
  legacy = c3a.attach(params, cfg, jax.random.PRNGKey(3))  # a raw uint32 key works as before
  assert legacy["fc0"]["c3a_kernel"].shape == by_key["fc0"]["c3a_kernel"].shape


@pytest.mark.parametrize(
  "rng,error,match",
  [
    (None, TypeError, r"got None"),
    (1.5, TypeError, r"got float"),
    (True, TypeError, r"got bool"),
    ("0", TypeError, r"got str"),
    (jnp.ones(3), TypeError, r"got an array of shape \(3,\) and dtype float32"),
    (jax.random.split(jax.random.key(0)), TypeError, r"got an array of shape \(2,\) and dtype key"),
    (-1, ValueError, r"an int seed must be in \[0, 2\*\*32\), got -1"),
    (2**32, ValueError, r"an int seed must be in \[0, 2\*\*32\), got 4294967296"),
  ],
)
def test_attach_names_a_bad_rng(rng, error, match):
  _, params = mlp_params(16, (16, 8))
  cfg = c3a.C3AConfig(block_size=8, target_modules=["fc0"])
  with pytest.raises(error, match=r"attach: rng .*" + match):
    c3a.attach(params, cfg, rng)
