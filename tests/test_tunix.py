"""Tunix's NNX Qwen 3, Llama 3 and Gemma 3, loaded from a Hugging Face checkpoint, against PEFT.

A tiny PyTorch model is saved locally (safetensors), Tunix loads it, and C3A adapters move
both ways: attached in c3a-jax and saved with ``c3a.key_maps``, then loaded by PEFT on the
PyTorch model; made by PEFT, then loaded into the Tunix model. Logits must agree within 1e-4.
Einsum (attention) and Linear (MLP) targets, a ``block_size_pattern``, gaussian kernels; Gemma
3's fused ``kv_einsum`` and ``qkv_einsum`` split into PEFT's ``k_proj``/``v_proj`` and join back.
"""

import json

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tunix.models.qwen3.model")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from tunix.models.gemma3 import params_safetensors as gemma3_params  # noqa: E402
from tunix.models.llama3 import params as llama3_params  # noqa: E402
from tunix.models.qwen3 import params as qwen3_params  # noqa: E402

import c3a_jax as c3a  # noqa: E402
from c3a_jax.cli.tunix import model_config  # noqa: E402  (Hugging Face sizes in Tunix's terms)

pytestmark = [pytest.mark.interop, pytest.mark.integration]

ATOL = 1e-4
SIZES = dict(
  vocab_size=64,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=8,
  rope_theta=1e6,  # tunix 0.1.7's Qwen3 ignores the config's rope_theta and uses 1e6
  rms_norm_eps=1e-6,
  tie_word_embeddings=False,
)
C3A = dict(
  block_size=8,
  block_size_pattern={"gate_proj": 16},
  target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
  init_weights="gaussian",
)


GEMMA3 = dict(query_pre_attn_scalar=8, sliding_window=4, tie_word_embeddings=True)


def _loader(family, loader):
  def load(path):
    with open(f"{path}/config.json") as f:
      return loader.create_model_from_safe_tensors(path, model_config(family, json.load(f), path))

  return load


# name -> (torch config class, its model, Tunix's loader, key map, sizes, Tunix's targets)
MODELS = {
  "qwen3": (
    transformers.Qwen3Config,
    transformers.Qwen3ForCausalLM,
    _loader("qwen3", qwen3_params),
    c3a.key_maps.TUNIX_QWEN3,
    SIZES,
    C3A["target_modules"],
  ),
  "llama3": (
    transformers.LlamaConfig,
    transformers.LlamaForCausalLM,
    _loader("llama3", llama3_params),
    c3a.key_maps.TUNIX_LLAMA3,
    SIZES,
    C3A["target_modules"],
  ),
  # Grouped keys (kv_einsum holds k_proj and v_proj), and one key per head (qkv_einsum).
  "gemma3-kv": (
    transformers.Gemma3TextConfig,
    transformers.Gemma3ForCausalLM,
    _loader("gemma3", gemma3_params),
    c3a.key_maps.TUNIX_GEMMA3,
    {**SIZES, **GEMMA3},
    ["q_einsum", "kv_einsum", "attn_vec_einsum", "gate_proj", "down_proj"],
  ),
  "gemma3-qkv": (
    transformers.Gemma3TextConfig,
    transformers.Gemma3ForCausalLM,
    _loader("gemma3", gemma3_params),
    c3a.key_maps.TUNIX_GEMMA3,
    {**SIZES, **GEMMA3, "num_key_value_heads": 4},
    ["qkv_einsum", "gate_proj"],
  ),
}
TOKENS = np.array([[1, 5, 9, 13, 17, 21, 25, 29], [2, 6, 10, 14, 18, 22, 26, 30]])


def _logits(model, tokens=TOKENS):
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
  return np.asarray(model(jnp.asarray(tokens), positions, None, mask)[0])


def _torch_logits(model):
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()


@pytest.fixture(scope="module", params=sorted(MODELS))
def pair(request, tmp_path_factory):
  config_cls, model_cls, load, key_map, sizes, targets = MODELS[request.param]
  torch.manual_seed(0)
  hf = model_cls(config_cls(**sizes)).eval()
  with torch.no_grad():  # Gemma's norms start at zero (a scale of 1): make them matter
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.normal_(0, 0.3)
  path = str(tmp_path_factory.mktemp(request.param) / "base")
  hf.save_pretrained(path, safe_serialization=True)
  return hf, load(path), key_map, path, targets


def test_tunix_loads_the_base_as_pytorch_computes_it(pair):
  hf, tunix, *_ = pair
  np.testing.assert_allclose(_logits(tunix), _torch_logits(hf), atol=ATOL)


def test_c3a_jax_adapter_loads_in_peft(pair, tmp_path):
  hf, tunix, key_map, base_path, targets = pair
  cfg = c3a.C3AConfig(**{**C3A, "target_modules": targets})
  adapted = c3a.attach(tunix, cfg, jax.random.key(0))
  kernels = [v for _, v in nnx.iter_graph(adapted) if isinstance(v, c3a.C3AParam)]
  assert len(kernels) == len(targets) * SIZES["num_hidden_layers"]
  assert all(k.get_metadata()["out_sharding"] == (None,) * 3 for k in kernels)  # as its layer's
  assert adapted.layers[1].mlp.gate_proj.c3a_kernel.shape == (4, 2, 16)
  c3a.save_adapter(str(tmp_path / "adapter"), adapted, cfg, key_map=key_map)
  base = type(hf).from_pretrained(base_path).eval()
  peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
  want = _torch_logits(peft_model)
  assert not np.allclose(want, _torch_logits(hf), atol=1e-2)
  np.testing.assert_allclose(_logits(adapted), want, atol=ATOL)


def test_an_adapter_trained_over_an_int8_base_loads_in_peft_on_the_full_model(pair, tmp_path):
  """QC3A: train over Tunix's model quantized to int8 by Qwix, save, and PEFT loads the
  adapter onto the full-precision PyTorch model, which computes what c3a-jax computes over the
  full-precision Tunix model with the same adapter."""
  pytest.importorskip("qwix")
  import optax

  hf, tunix, key_map, base_path, _ = pair
  tokens = jnp.asarray(TOKENS)
  positions = jnp.broadcast_to(jnp.arange(TOKENS.shape[1]), TOKENS.shape)
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((TOKENS.shape[1],) * 2, bool)), (*TOKENS.shape, 8))
  # Every projection; not Gemma's embedder, whose table its tied output einsum would quantize.
  layers = r".*(_proj|_einsum)"
  quantized = c3a.quantize.quantize_nnx(
    tunix, tokens, positions, None, mask, weights="int8", module_path=layers
  )
  cfg = c3a.C3AConfig(**{**C3A, "target_modules": ["gate_proj", "down_proj"]})
  adapted = c3a.attach(quantized, cfg, jax.random.key(0))
  opt = nnx.Optimizer(adapted, optax.adam(1e-2), wrt=c3a.C3AParam)

  def loss(m):
    with c3a.intercept():
      logits = m(tokens, positions, None, mask)[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

  @nnx.jit
  def step(m, opt):
    value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, c3a.C3AParam))(m)
    opt.update(m, grads)
    return value

  losses = [float(step(adapted, opt)) for _ in range(3)]
  assert losses[-1] < losses[0]
  c3a.save_adapter(str(tmp_path / "adapter"), adapted, cfg, key_map=key_map)
  full, _ = c3a.load_adapter(str(tmp_path / "adapter"), tunix, key_map=key_map)
  base = type(hf).from_pretrained(base_path).eval()
  want = _torch_logits(peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval())
  np.testing.assert_allclose(_logits(full), want, atol=ATOL)  # PEFT = c3a-jax, full precision
  quantization_error = np.abs(_logits(quantized) - _logits(tunix)).max()
  assert 0 < np.abs(_logits(adapted) - want).max() <= 2 * quantization_error + ATOL


def test_peft_adapter_loads_in_tunix(pair, tmp_path):
  hf, tunix, key_map, base_path, _ = pair
  base = type(hf).from_pretrained(base_path).eval()
  peft_model = peft.get_peft_model(base, peft.C3AConfig(**C3A)).eval()
  peft_model.save_pretrained(str(tmp_path / "peft"))
  want = _torch_logits(peft_model)
  loaded, cfg = c3a.load_adapter(str(tmp_path / "peft"), tunix, key_map=key_map)
  assert cfg.block_size_pattern == {"gate_proj": 16}
  assert not any(isinstance(v, c3a.C3AParam) for _, v in nnx.iter_graph(tunix))
  assert any(isinstance(v, c3a.C3AParam) for _, v in nnx.iter_graph(loaded))
  np.testing.assert_allclose(_logits(loaded), want, atol=ATOL)
  np.testing.assert_allclose(_logits(c3a.merge(loaded)), want, atol=ATOL)


def test_a_tunix_adapter_merges_into_a_hugging_face_checkpoint(pair, tmp_path):
  hf, tunix, key_map, base_path, targets = pair
  cfg = c3a.C3AConfig(**{**C3A, "target_modules": targets})
  adapted = c3a.attach(tunix, cfg, jax.random.key(3))
  c3a.save_adapter(str(tmp_path / "adapter"), adapted, cfg, key_map=key_map)
  c3a.merge_checkpoint(base_path, str(tmp_path / "adapter"), str(tmp_path / "merged"))
  merged = type(hf).from_pretrained(str(tmp_path / "merged")).eval()
  np.testing.assert_allclose(_torch_logits(merged), _logits(adapted), atol=ATOL)
  assert not np.allclose(_torch_logits(merged), _torch_logits(hf), atol=1e-2)


def test_cli_fine_tunes_a_tunix_model_and_peft_loads_the_adapter(pair, tmp_path):
  from c3a_jax import cli
  from tests.test_cli import sentences, tokenizer, write_jsonl

  hf, _, _, base_path, targets = pair
  tokenizer(__import__("pathlib").Path(base_path))
  rows = [{"instruction": "rate the film", "output": r["sentence"]} for r in sentences(32, 2)]
  cfg = {
    "task": "causal_lm",
    "model": {"name": base_path, "library": "tunix"},
    "data": {
      "name": str(write_jsonl(tmp_path / "train.json", rows)),
      "eval_split": None,
      "max_length": 12,
      "prompt_template": "{instruction} {output}",
    },
    "c3a": {"block_size": 8, "target_modules": targets},
    "train": {"steps": 12, "batch_size": 8, "lr": 0.5, "log_every": 4},
    "output_dir": str(tmp_path / "run"),
  }
  (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
  assert cli.main(["train", "--quiet", "--config", str(tmp_path / "config.yaml")]) == 0
  losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert losses[-1] < losses[0]
  base = type(hf).from_pretrained(base_path).eval()
  peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter")).eval()
  assert cli.main(["merge", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
  merged = type(hf).from_pretrained(str(tmp_path / "merged")).eval()
  np.testing.assert_allclose(_torch_logits(merged), _torch_logits(peft_model), atol=ATOL)
  assert not np.allclose(_torch_logits(merged), _torch_logits(hf), atol=1e-3)


@pytest.mark.parametrize(
  "family, change, field",
  [
    ("qwen3", {"rope_theta": 1e4}, "rope_theta"),
    ("llama3", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ("gemma3", {"query_pre_attn_scalar": 256}, "query_pre_attn_scalar"),
    ("gemma3", {"tie_word_embeddings": False}, "tie_word_embeddings"),
    ("gemma3", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ("gemma3", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
  ],
)
def test_a_checkpoint_tunix_would_compute_differently_is_refused(family, change, field):
  gemma = transformers.Gemma3TextConfig(**{**SIZES, **GEMMA3}).to_dict()
  sizes = gemma if family == "gemma3" else SIZES
  with pytest.raises(ValueError, match=rf"base/config.json: {field}=.*its logits would differ"):
    model_config(family, {**sizes, **change}, "base")
