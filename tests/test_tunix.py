"""Tunix's NNX Qwen 3 and Llama 3, loaded from a Hugging Face checkpoint, against PyTorch PEFT.

A tiny PyTorch model is saved locally (safetensors), Tunix loads it, and C3A adapters move
both ways: attached in c3a-jax and saved with ``c3a.key_maps``, then loaded by PEFT on the
PyTorch model; made by PEFT, then loaded into the Tunix model. Logits must agree within 1e-4.
Einsum (attention) and Linear (MLP) targets, a ``block_size_pattern``, gaussian kernels.
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


def _qwen3(path):
  return qwen3_params.create_model_from_safe_tensors(path, model_config("qwen3", SIZES, path))


def _llama3(path):
  return llama3_params.create_model_from_safe_tensors(path, model_config("llama3", SIZES, path))


MODELS = {
  "qwen3": (
    transformers.Qwen3Config,
    transformers.Qwen3ForCausalLM,
    _qwen3,
    c3a.key_maps.TUNIX_QWEN3,
  ),
  "llama3": (
    transformers.LlamaConfig,
    transformers.LlamaForCausalLM,
    _llama3,
    c3a.key_maps.TUNIX_LLAMA3,
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
  config_cls, model_cls, load, key_map = MODELS[request.param]
  torch.manual_seed(0)
  hf = model_cls(config_cls(**SIZES)).eval()
  path = str(tmp_path_factory.mktemp(request.param) / "base")
  hf.save_pretrained(path, safe_serialization=True)
  tunix = load(path)
  return hf, tunix, key_map, path


def test_tunix_loads_the_base_as_pytorch_computes_it(pair):
  hf, tunix, _, _ = pair
  np.testing.assert_allclose(_logits(tunix), _torch_logits(hf), atol=ATOL)


def test_c3a_jax_adapter_loads_in_peft(pair, tmp_path):
  hf, tunix, key_map, base_path = pair
  cfg = c3a.C3AConfig(**C3A)
  adapted = c3a.attach(tunix, cfg, jax.random.key(0))
  q = adapted.layers[0].attn.q_proj.c3a_kernel
  assert isinstance(q, c3a.C3AParam)
  assert q.get_metadata()["out_sharding"] == (None, None, None)  # named as its layer's w
  assert adapted.layers[1].mlp.gate_proj.c3a_kernel.shape == (4, 2, 16)
  c3a.save_adapter(str(tmp_path / "adapter"), adapted, cfg, key_map=key_map)
  base = type(hf).from_pretrained(base_path).eval()
  peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
  want = _torch_logits(peft_model)
  assert not np.allclose(want, _torch_logits(hf), atol=1e-2)
  np.testing.assert_allclose(_logits(adapted), want, atol=ATOL)


def test_peft_adapter_loads_in_tunix(pair, tmp_path):
  hf, tunix, key_map, base_path = pair
  base = type(hf).from_pretrained(base_path).eval()
  peft_model = peft.get_peft_model(base, peft.C3AConfig(**C3A)).eval()
  peft_model.save_pretrained(str(tmp_path / "peft"))
  want = _torch_logits(peft_model)
  loaded, cfg = c3a.load_adapter(str(tmp_path / "peft"), tunix, key_map=key_map)
  assert cfg.block_size_pattern == {"gate_proj": 16}
  assert not hasattr(tunix.layers[0].attn.q_proj, "c3a_kernel")
  np.testing.assert_allclose(_logits(loaded), want, atol=ATOL)
  np.testing.assert_allclose(_logits(c3a.merge(loaded)), want, atol=ATOL)


def test_a_tunix_adapter_merges_into_a_hugging_face_checkpoint(pair, tmp_path):
  hf, tunix, key_map, base_path = pair
  cfg = c3a.C3AConfig(**C3A)
  adapted = c3a.attach(tunix, cfg, jax.random.key(3))
  c3a.save_adapter(str(tmp_path / "adapter"), adapted, cfg, key_map=key_map)
  c3a.merge_checkpoint(base_path, str(tmp_path / "adapter"), str(tmp_path / "merged"))
  merged = type(hf).from_pretrained(str(tmp_path / "merged")).eval()
  np.testing.assert_allclose(_torch_logits(merged), _logits(adapted), atol=ATOL)
  assert not np.allclose(_torch_logits(merged), _torch_logits(hf), atol=1e-2)


def test_cli_fine_tunes_a_tunix_model_and_peft_loads_the_adapter(pair, tmp_path):
  from c3a_jax import cli
  from tests.test_cli import sentences, tokenizer, write_jsonl

  hf, _, _, base_path = pair
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
    "c3a": {"block_size": 8, "target_modules": ["q_proj", "v_proj", "gate_proj"]},
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
