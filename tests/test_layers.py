"""C3A on multi-axis kernels (DenseGeneral, Einsum, attention), scanned stacks and boxed params.

The reference for a multi-axis layer is the layer itself with ``kernel + delta`` for its kernel,
``delta`` being the float64 definition (tests/reference.py) laid out by the layout rule: the
kernel's leading "in" axes flattened to rows, the rest to columns. The reference for a scanned
stack is the same model unrolled, each layer given its slice of every stacked leaf.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from jax.sharding import PartitionSpec as P

import c3a_jax as c3a
from c3a_jax import ops
from tests import backend
from tests.reference import dense_reference

STRATEGIES = ("fft", "freq_major", "dense", "fold", "auto")


def _reference_kernel(kernel, w):
  """``kernel + delta`` by the layout rule, the delta from the float64 definition."""
  delta = dense_reference(np.asarray(w)).T  # (d_in, d_out)
  return np.asarray(kernel, np.float64) + delta.reshape(np.shape(kernel))


# (layer, input shape): every kind of contraction the layout rule covers.
LAYERS = {
  "dense_general_heads": (nn.DenseGeneral((2, 8)), (3, 5, 16)),
  "dense_general_out": (nn.DenseGeneral(16, axis=(-2, -1)), (3, 5, 2, 8)),
  "dense_general_split_axes": (nn.DenseGeneral((4, 4), axis=(1, -1)), (3, 4, 5, 2)),
  "einsum_q": (nn.Einsum((16, 2, 8), "BTD,DNH->BTNH"), (3, 5, 16)),
  "einsum_o_ellipsis": (nn.Einsum((2, 8, 16), "...NH,NHD->...D", use_bias=False), (3, 5, 2, 8)),
}


# The default tier runs one (folded: the path float32 layers take); the integration tier all.
DEFAULT = {("dense_general_split_axes", "fold")}
CASES = [
  pytest.param(name, strategy, marks=() if (name, strategy) in DEFAULT else pytest.mark.integration)
  for name in sorted(LAYERS)
  for strategy in STRATEGIES
]


@pytest.mark.parametrize(("name", "strategy"), CASES)
def test_multi_axis_layers_equal_the_reference(name, strategy):
  layer, shape = LAYERS[name]
  x = jax.random.normal(jax.random.key(0), shape)
  params = layer.init(jax.random.key(1), x)["params"]
  forward = lambda p: layer.apply({"params": p}, x)
  cfg = c3a.C3AConfig(block_size=4, target_modules=".*", init_weights="gaussian")
  adapted = c3a.attach(params, cfg, jax.random.key(2), forward=forward)
  w = adapted["c3a_kernel"]
  kernel = adapted["kernel"]
  d_out, d_in = dense_reference(np.asarray(w)).shape
  assert d_in * d_out == kernel.size
  want = layer.apply({"params": {**params, "kernel": _reference_kernel(kernel, w)}}, x)
  got = jax.jit(c3a.intercepted(layer.apply, strategy=strategy))({"params": adapted}, x)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  merged = c3a.merge(adapted)
  np.testing.assert_allclose(layer.apply({"params": merged}, x), want, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(
    c3a.unmerge(merged, c3a.split(adapted)[0])["kernel"], kernel, atol=1e-5
  )

  # The kernel gradient against the layer's own contraction of a dense delta.
  g = jax.random.normal(jax.random.key(3), want.shape)

  def loss(w, run):
    return jnp.vdot(run({**adapted, "c3a_kernel": w}), g)

  def dense_run(p):
    delta = ops.delta_weight(p["c3a_kernel"]).reshape(kernel.shape)
    base = {k: v for k, v in p.items() if k != "c3a_kernel"}
    return layer.apply({"params": {**base, "kernel": kernel + delta}}, x)

  wrapped = c3a.intercepted(layer.apply, strategy=strategy)
  got_grad = jax.jit(jax.grad(loss, argnums=0), static_argnums=1)(
    w, lambda p: wrapped({"params": p}, x)
  )
  np.testing.assert_allclose(got_grad, jax.grad(loss)(w, dense_run), atol=1e-4, rtol=1e-4)


def test_attention_adapts_query_key_value_and_out():
  attn = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, out_features=8)
  x = jax.random.normal(jax.random.key(0), (2, 6, 8))
  params = attn.init(jax.random.key(1), x)["params"]
  cfg = c3a.C3AConfig(block_size=4, target_modules="all-linear", init_weights="gaussian")
  adapted = c3a.attach(
    params, cfg, jax.random.key(2), forward=lambda p: attn.apply({"params": p}, x)
  )
  assert {k: v["c3a_kernel"].shape for k, v in adapted.items()} == {
    "query": (4, 2, 4),
    "key": (4, 2, 4),
    "value": (4, 2, 4),
    "out": (2, 4, 4),
  }
  reference = {
    k: {**v, "kernel": _reference_kernel(v["kernel"], v["c3a_kernel"])} for k, v in adapted.items()
  }
  reference = {k: {n: a for n, a in v.items() if n != "c3a_kernel"} for k, v in reference.items()}
  want = attn.apply({"params": reference}, x)
  np.testing.assert_allclose(c3a.intercepted(attn.apply)({"params": adapted}, x), want, atol=2e-5)
  assert not np.allclose(attn.apply({"params": params}, x), want, atol=1e-3)


def test_layers_c3a_cannot_adapt_are_refused_at_attach():
  x = jnp.ones((2, 3, 16))
  cfg = c3a.C3AConfig(block_size=4, target_modules=".*")
  cases = {
    "batch_dims": (nn.DenseGeneral(8, batch_dims=(0,)), jnp.ones((2, 16)), "batch_dims"),
    "trailing_in": (
      nn.Einsum((8, 2, 8), "BTNH,DNH->BTD"),
      jnp.ones((2, 3, 2, 8)),
      r"must come first in the kernel 'DNH'",
    ),
    "per_head": (
      nn.Einsum((2, 8, 8), "BNH,NHK->BNK"),
      jnp.ones((3, 2, 8)),
      r"batch or summed axes",
    ),
    "conv": (nn.Conv(8, (3,)), x, r"Conv is not a layer C3A adapts"),
  }
  for layer, inputs, match in cases.values():
    params = layer.init(jax.random.key(0), inputs)["params"]
    with pytest.raises(ValueError, match=match):
      c3a.attach(
        params, cfg, jax.random.key(1), forward=lambda p: layer.apply({"params": p}, inputs)
      )
  general = nn.DenseGeneral((2, 8))
  params = general.init(jax.random.key(0), x)["params"]
  with pytest.raises(ValueError, match=r"3-D kernel \(16, 2, 8\).*pass forward="):
    c3a.attach(params, cfg, jax.random.key(1))
  with pytest.raises(
    ValueError, match=r"block size 3 does not divide .* d_in=16, d_out=16.* \[1, 2, 4, 8, 16\]"
  ):
    c3a.attach(
      params,
      cfg.replace(block_size=3),
      jax.random.key(1),
      forward=lambda p: general.apply({"params": p}, x),
    )
  with pytest.warns(UserWarning, match=r"all-linear' leaves out \[''\]"):
    with pytest.raises(ValueError, match="matched no layer"):
      c3a.attach(params, cfg.replace(target_modules="all-linear"), jax.random.key(1))


class Block(nn.Module):
  """A pre-norm transformer block with DenseGeneral attention and logically partitioned kernels."""

  heads: int = 2
  head_dim: int = 8

  @nn.compact
  def __call__(self, x, _):
    def dense(features, axis, names, name):
      init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)
      return nn.DenseGeneral(features, axis=axis, kernel_init=init, name=name)

    h = nn.LayerNorm()(x)
    q = dense((self.heads, self.head_dim), -1, ("embed", "heads", "kv"), "query")(h)
    v = dense((self.heads, self.head_dim), -1, ("embed", "heads", "kv"), "value")(h)
    att = nn.dot_product_attention(q, q, v)
    x = x + dense(x.shape[-1], (-2, -1), ("heads", "kv", "embed"), "out")(att)
    y = nn.Dense(
      32,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
      name="up",
    )(x)
    return x + nn.Dense(x.shape[-1], name="down")(nn.gelu(y)), None


class Scanned(nn.Module):
  layers: int = 3

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(
      Block,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=self.layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x, _ = stack(name="layers")(x, None)
    return nn.Dense(4, name="lm_head")(x)


class Unrolled(nn.Module):
  layers: int = 3

  @nn.compact
  def __call__(self, x):
    for i in range(self.layers):
      x, _ = Block(name=f"layers_{i}")(x, None)
    return nn.Dense(4, name="lm_head")(x)


def _unroll(params, layers):
  """The unrolled twin's params: layer i gets slice i of every stacked leaf (boxes dropped)."""
  plain = nn.unbox(params)
  stacked = plain.pop("layers")
  for i in range(layers):
    plain[f"layers_{i}"] = jax.tree.map(lambda a: a[i], stacked)
  return plain


@pytest.fixture(scope="module")
def scanned():
  model, x = Scanned(), jax.random.normal(jax.random.key(0), (2, 5, 16))
  params = jax.jit(model.init)(jax.random.key(1), x)["params"]
  cfg = c3a.C3AConfig(block_size=4, target_modules="all-linear", init_weights="gaussian")
  forward = lambda p: model.apply({"params": p}, x)
  return model, x, params, cfg, c3a.attach(params, cfg, jax.random.key(2), forward=forward)


@pytest.mark.parametrize("strategy", ["auto", pytest.param("fft", marks=pytest.mark.integration)])
def test_scanned_stack_equals_its_unrolled_twin(scanned, strategy):
  model, x, params, _cfg, adapted = scanned
  layers = adapted["layers"]
  assert sorted(k for k, v in layers.items() if "c3a_kernel" in v) == [
    "down",
    "out",
    "query",
    "up",
    "value",
  ]
  assert nn.unbox(layers["query"]["c3a_kernel"]).shape == (3, 4, 4, 4)
  assert layers["down"]["c3a_kernel"].shape == (3, 4, 8, 4)
  assert nn.unbox(layers["up"]["c3a_kernel"]).shape == (3, 8, 4, 4)
  assert "c3a_kernel" not in adapted["lm_head"]
  # Boxes kept; the C3A kernel's box names its stack axis as the layer's kernel does.
  assert isinstance(layers["query"]["kernel"], nn.LogicallyPartitioned)
  assert layers["query"]["c3a_kernel"].names == ("layers", None, None, None)
  assert layers["up"]["c3a_kernel"].names == ("layers", None, None, None)
  specs = nn.get_partition_spec(adapted)
  assert specs["layers"]["query"]["c3a_kernel"] == P("layers", None, None, None)

  got = jax.jit(c3a.intercepted(model.apply, strategy=strategy))({"params": adapted}, x)
  want = jax.jit(c3a.intercepted(Unrolled().apply, strategy="dense"))(
    {"params": _unroll(adapted, 3)}, x
  )
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert not np.allclose(model.apply({"params": params}, x), want, atol=1e-3)


@pytest.mark.integration
def test_a_merged_stack_equals_its_adapted_self(scanned):
  model, x, params, _cfg, adapted = scanned
  want = jax.jit(c3a.intercepted(model.apply))({"params": adapted}, x)
  merged = c3a.merge(adapted)
  assert isinstance(merged["layers"]["query"]["kernel"], nn.LogicallyPartitioned)
  np.testing.assert_allclose(jax.jit(model.apply)({"params": merged}, x), want, atol=2e-5)
  restored = c3a.unmerge(merged, c3a.split(adapted)[0])
  np.testing.assert_allclose(
    nn.unbox(restored["layers"]["out"]["kernel"]),
    nn.unbox(params["layers"]["out"]["kernel"]),
    atol=1e-5,
  )


def test_scanned_stack_counts_and_labels(scanned):
  _model, _x, _params, cfg, adapted = scanned
  summary = c3a.summary(adapted, cfg)
  per_layer = 3 * (4 * 4 * 4 * 3 + 4 * 8 * 4 * 2)  # query, value, out, up (8x4 blocks), down
  assert summary.trainable == per_layer
  labels = c3a.labels(adapted, cfg)
  assert labels["layers"]["query"]["c3a_kernel"] == "c3a"
  assert labels["layers"]["query"]["kernel"] == "frozen"


@pytest.mark.integration
def test_scanned_stack_trains_its_c3a_kernels_only(scanned):
  model, x, _params, cfg, adapted = scanned
  tx = c3a.optimizer(optax.adam(1e-2), adapted, cfg)

  @jax.jit
  def step(p):
    updates, _ = tx.update(jax.grad(_loss(model, x))(p), tx.init(p), p)
    return optax.apply_updates(p, updates)

  moved = step(adapted)
  changed = jax.tree.map(lambda a, b: bool((a != b).any()), nn.unbox(moved), nn.unbox(adapted))
  assert changed["layers"]["query"]["c3a_kernel"]
  assert not changed["layers"]["query"]["kernel"]
  assert not changed["lm_head"]["kernel"]


def _loss(model, x):
  return lambda p: jnp.mean(c3a.intercepted(model.apply)({"params": p}, x) ** 2)


def test_fsdp_places_a_stacked_c3a_kernel_by_its_output_blocks(scanned):
  _model, _x, _params, _cfg, adapted = scanned
  mesh = backend.cpu_mesh(data=4, fsdp=2)
  shardings = c3a.training.param_shardings(adapted, mesh)
  assert shardings["layers"]["query"]["c3a_kernel"].value.spec == P(None, "fsdp")
  assert isinstance(shardings["layers"]["query"]["kernel"], nn.LogicallyPartitioned)


@pytest.mark.integration
def test_a_stack_runs_sharded(scanned):
  model, x, _params, _cfg, adapted = scanned
  mesh = backend.cpu_mesh(data=4, fsdp=2)
  placed = jax.device_put(adapted, c3a.training.param_shardings(adapted, mesh))
  loss = _loss(model, x)
  one = jax.device_put(adapted, backend.cpu_devices(1)[0])  # the same backend, one device
  np.testing.assert_allclose(jax.jit(loss)(placed), jax.jit(loss)(one), rtol=1e-5)


def test_scan_without_forward_is_refused_and_all_linear_warns(scanned):
  params = scanned[2]
  with pytest.raises(
    ValueError, match=r"'layers.query' has a 4-D kernel \(3, 16, 2, 8\).*forward="
  ):
    c3a.attach(params, c3a.C3AConfig(block_size=4, target_modules=["query"]), jax.random.key(0))
  with pytest.warns(UserWarning, match=r"all-linear' leaves out \[.*'layers.query'"):
    with pytest.raises(ValueError, match="matched no layer"):
      c3a.attach(
        params, c3a.C3AConfig(block_size=4, target_modules="all-linear"), jax.random.key(0)
      )


def test_a_stack_saves_as_peft_layers_and_loads_back_into_the_stack(scanned, tmp_path):
  _model, _x, params, cfg, adapted = scanned
  c3a.save_adapter(tmp_path / "stacked", adapted, cfg)
  # The unrolled twin, its layers named as PEFT numbers them, writes the same file.
  twin_map = [(r"^layers_(\d+)\.", r"layers.\1.")]
  c3a.save_adapter(tmp_path / "twin", _unroll(adapted, 3), cfg, key_map=twin_map)
  stacked = safetensors.numpy.load_file(tmp_path / "stacked" / "adapter_model.safetensors")
  twin = safetensors.numpy.load_file(tmp_path / "twin" / "adapter_model.safetensors")
  assert sorted(stacked) == sorted(twin)
  assert "base_model.model.layers.2.query.c3a_kernel" in stacked
  for key in stacked:
    np.testing.assert_array_equal(stacked[key], twin[key])
  saved = c3a.C3AConfig.load(str(tmp_path / "stacked"))
  assert "layers.1.out" in saved.target_modules and len(saved.target_modules) == 15

  loaded, _ = c3a.load_adapter(str(tmp_path / "stacked"), params)
  np.testing.assert_array_equal(
    loaded["layers"]["query"]["c3a_kernel"], nn.unbox(adapted["layers"]["query"]["c3a_kernel"])
  )
  for name, leaf in c3a.split(adapted)[0]["layers"].items():
    np.testing.assert_array_equal(
      loaded["layers"][name]["c3a_kernel"], nn.unbox(leaf["c3a_kernel"])
    )
  # A layer its target_modules name but the file lacks would get a fresh init in PEFT: refused.
  del stacked["base_model.model.layers.1.query.c3a_kernel"]
  safetensors.numpy.save_file(stacked, tmp_path / "stacked" / "adapter_model.safetensors")
  with pytest.raises(ValueError, match=r"no c3a_kernel for layer 'layers.1.query' \(layer 1 of"):
    c3a.load_adapter(str(tmp_path / "stacked"), params)
  # A layer the file and its target_modules leave out is not adapted, as in PEFT: zeros.
  kept = tuple(t for t in saved.target_modules if t != "layers.1.query")
  saved.replace(target_modules=kept).save(str(tmp_path / "stacked"))
  partial, _ = c3a.load_adapter(str(tmp_path / "stacked"), params)
  query = partial["layers"]["query"]["c3a_kernel"]
  assert not query[1].any() and query[0].any() and query[2].any()


@pytest.mark.integration
def test_layers_to_transform_picks_layers_of_a_stack(scanned, tmp_path):
  model, x, params, _cfg, _ = scanned
  cfg = c3a.C3AConfig(
    block_size=4,
    target_modules=["query", "down"],
    layers_to_transform=[0, 2],
    layers_pattern="layers",
    init_weights="gaussian",
  )
  adapted = c3a.attach(
    params, cfg, jax.random.key(3), forward=lambda p: model.apply({"params": p}, x)
  )
  w = nn.unbox(adapted["layers"]["query"]["c3a_kernel"])
  assert not w[1].any() and w[0].any() and w[2].any()
  assert c3a.summary(adapted, cfg).trainable == 3 * (64 + 128)  # the stack's whole leaves

  tx = c3a.optimizer(optax.sgd(1.0), adapted, cfg)
  grads = jax.jit(jax.grad(_loss(model, x)))(adapted)
  updates, _ = tx.update(grads, tx.init(adapted), adapted)
  moved = nn.unbox(optax.apply_updates(adapted, updates))["layers"]["down"]["c3a_kernel"]
  assert not moved[1].any()  # layer 1 is left out: it stays zero
  assert (moved[0] != nn.unbox(adapted)["layers"]["down"]["c3a_kernel"][0]).any()

  c3a.save_adapter(str(tmp_path / "a"), adapted, cfg)
  keys = safetensors.numpy.load_file(tmp_path / "a" / "adapter_model.safetensors")
  assert sorted(keys) == sorted(
    f"base_model.model.layers.{i}.{n}.c3a_kernel" for i in (0, 2) for n in ("query", "down")
  )
  trained = c3a.combine({"layers": {"down": {"c3a_kernel": moved.at[1].set(1.0)}}}, adapted)
  with pytest.raises(ValueError, match=r"non-zero in layers \[1\], which layers_to_transform"):
    c3a.save_adapter(str(tmp_path / "b"), trained, cfg)


def test_key_maps_name_layers_as_peft_does_both_ways(scanned, tmp_path):
  _model, _x, params, cfg, adapted = scanned
  hf = [
    (r"^layers\.(\d+)\.(query|value)$", r"model.layers.\1.self_attn.\2"),
    (r"^layers\.", "model.layers."),
  ]
  c3a.save_adapter(tmp_path / "hf", adapted, cfg, key_map=hf)
  keys = safetensors.numpy.load_file(tmp_path / "hf" / "adapter_model.safetensors")
  assert "base_model.model.model.layers.0.self_attn.query.c3a_kernel" in keys
  assert "base_model.model.model.layers.2.up.c3a_kernel" in keys
  with pytest.raises(ValueError, match="key_map needs the model's params"):
    c3a.load_adapter(str(tmp_path / "hf"), key_map=hf)
  with pytest.raises(
    ValueError,
    match=r"names module 'model.layers.0.\w+', which the model does not have \(no 'model'\)",
  ):
    c3a.load_adapter(str(tmp_path / "hf"), params)
  loaded, _ = c3a.load_adapter(str(tmp_path / "hf"), params, key_map=hf)
  np.testing.assert_array_equal(
    loaded["layers"]["up"]["c3a_kernel"], nn.unbox(adapted["layers"]["up"]["c3a_kernel"])
  )
  with pytest.raises(ValueError, match=r"key_map entry 0: '\(' is not a regex"):
    c3a.save_adapter(tmp_path / "bad", adapted, cfg, key_map=[("(", "x")])


def test_a_key_map_splits_a_fused_layer_by_output_rows_and_joins_it_back(tmp_path):
  # A fused k/v projection (Gemma's kv_einsum) is two PyTorch Linears in PEFT's model.
  params = {"attn": {"kv": {"kernel": jnp.ones((16, 32))}}}
  cfg = c3a.C3AConfig(block_size=8, target_modules=["kv"], init_weights="gaussian")
  adapted = c3a.attach(params, cfg, jax.random.key(0))
  fused = [(r"^attn\.kv$", ("attn.k_proj", "attn.v_proj"))]
  c3a.save_adapter(tmp_path / "a", adapted, cfg, key_map=fused)
  keys = safetensors.numpy.load_file(tmp_path / "a" / "adapter_model.safetensors")
  full = np.asarray(ops.delta_weight(adapted["attn"]["kv"]["c3a_kernel"]))  # (in, out)
  for i, name in enumerate(("k_proj", "v_proj")):
    part = keys[f"base_model.model.attn.{name}.c3a_kernel"]
    assert part.shape == (2, 2, 8)  # each torch Linear's own (d_out // b, d_in // b, b)
    np.testing.assert_allclose(ops.delta_weight(part), full[:, 16 * i : 16 * (i + 1)], atol=1e-6)
  assert c3a.C3AConfig.load(str(tmp_path / "a")).target_modules == ("attn.k_proj", "attn.v_proj")

  loaded, _ = c3a.load_adapter(str(tmp_path / "a"), params, key_map=fused)
  np.testing.assert_array_equal(
    loaded["attn"]["kv"]["c3a_kernel"], adapted["attn"]["kv"]["c3a_kernel"]
  )
  # A part its target_modules name but the file lacks would get a fresh init in PEFT: refused.
  del keys["base_model.model.attn.k_proj.c3a_kernel"]
  safetensors.numpy.save_file(keys, str(tmp_path / "a" / "adapter_model.safetensors"))
  with pytest.raises(ValueError, match=r"no c3a_kernel for layer 'attn.k_proj' \(part 1 of 2"):
    c3a.load_adapter(str(tmp_path / "a"), params, key_map=fused)
  # PEFT adapting v_proj alone: the k rows stay unadapted (zero).
  c3a.C3AConfig.load(str(tmp_path / "a")).replace(target_modules=["attn.v_proj"]).save(
    str(tmp_path / "a")
  )
  loaded, _ = c3a.load_adapter(str(tmp_path / "a"), params, key_map=fused)
  w = loaded["attn"]["kv"]["c3a_kernel"]
  assert not w[:2].any()
  np.testing.assert_array_equal(w[2:], adapted["attn"]["kv"]["c3a_kernel"][2:])

  odd = c3a.attach(params, cfg.replace(block_size=16), jax.random.key(0))  # 2 blocks in 3 parts
  with pytest.raises(ValueError, match=r"splits layer 'attn.kv' into 3 parts .* 2 blocks of 16"):
    c3a.save_adapter(
      tmp_path / "b", odd, cfg.replace(block_size=16), key_map=[(r"kv$", ("a", "b", "c"))]
    )


@pytest.mark.integration
def test_vmapped_layers_get_a_stacked_kernel_each_member_its_slice():
  ensemble = nn.vmap(
    nn.Dense,
    variable_axes={"params": 0},
    split_rngs={"params": True},
    in_axes=0,
    out_axes=0,
  )(16)
  x = jax.random.normal(jax.random.key(0), (3, 5, 16))  # member, tokens, features
  params = ensemble.init(jax.random.key(1), x)["params"]
  cfg = c3a.C3AConfig(block_size=4, target_modules=".*", init_weights="gaussian")
  adapted = c3a.attach(
    params, cfg, jax.random.key(2), forward=lambda p: ensemble.apply({"params": p}, x)
  )
  assert adapted["c3a_kernel"].shape == (3, 4, 4, 4)
  got = c3a.intercepted(ensemble.apply)({"params": adapted}, x)
  for i in range(3):
    kernel = _reference_kernel(adapted["kernel"][i], adapted["c3a_kernel"][i])
    np.testing.assert_allclose(got[i], x[i] @ kernel + adapted["bias"][i], atol=2e-5)


@pytest.mark.integration
def test_a_boxed_stack_trains_and_checkpoints(scanned, tmp_path):
  model, x, _params, cfg, adapted = scanned
  adapter, base = c3a.split(adapted, cfg)
  tx = c3a.optimizer(optax.adam(1e-2), adapter, cfg)

  def loss_fn(params, batch, rng):
    return jnp.mean(model.apply({"params": params}, batch["x"]) ** 2)

  step = jax.jit(c3a.make_train_step(loss_fn, tx))
  state = c3a.TrainState.create(adapter, tx)
  for _ in range(2):
    state, _ = step(state, base, {"x": x})
  with c3a.training.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(state, data_position=2)
  with c3a.training.Checkpointer(str(tmp_path)) as ckpt:
    restored, position = ckpt.restore(c3a.TrainState.create(adapter, tx))
  assert position == 2
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(restored), nn.unbox(state))
  assert isinstance(restored.params["layers"]["query"]["c3a_kernel"], nn.LogicallyPartitioned)
