"""A causal LM from a Hugging Face safetensors checkpoint, run by Tunix's NNX Qwen 3, Llama 3
or Gemma 3 (text).

The runner trains params trees; an NNX model is read as one (:func:`c3a_jax.nnx_params`: its
``nnx.Param`` values by module path) and rebuilt from one inside each traced step, so every
weight is an argument of the jitted function. The adapter is saved under Hugging Face's names
(``c3a.key_maps``), so PEFT loads it on the PyTorch model, and ``c3a-jax merge`` writes the
base checkpoint with the adapter merged (:func:`c3a_jax.merge_checkpoint`).
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import c3a_jax as c3a
from c3a_jax.cli import hub
from c3a_jax.cli.experiment import Experiment
from c3a_jax.cli.job import Job, Log, describe_quantized, quantize_errors, quantize_rule

# Hugging Face model_type -> (tunix package, its loader module, its key map).
FAMILIES = {
  "qwen3": ("qwen3", "params", c3a.key_maps.TUNIX_QWEN3),
  "llama": ("llama3", "params", c3a.key_maps.TUNIX_LLAMA3),
  "gemma3_text": ("gemma3", "params_safetensors", c3a.key_maps.TUNIX_GEMMA3),
}


# Tunix's package -> its model class.
CLASSES = {"qwen3": "Qwen3", "llama3": "Llama3", "gemma3": "Gemma3"}


def _checkpoint(name: str, revision: str | None, files: str | None = None) -> str:
  """The checkpoint's local directory (a hub name is downloaded, as transformers would; only
  the files matching the glob ``files``, if given)."""
  if os.path.isdir(name):
    return name
  hub.check_local(name, "model.name", "model")
  hub.offline_if_unreachable()
  import huggingface_hub

  try:
    return huggingface_hub.snapshot_download(name, revision=revision, allow_patterns=files)
  except Exception as e:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ValueError(
      f"could not load model {name!r} ({hub._offline_hint(name)}): {first}"
    ) from None


def _tunix(family: str, module: str) -> Any:
  """``tunix.models.<family>.<module>``, or a ValueError saying how to install Tunix."""
  try:
    return importlib.import_module(f"tunix.models.{family}.{module}")
  except ImportError:
    raise ValueError('model.library: tunix needs Tunix: pip install "c3a-jax[tunix]"') from None


def _family(name: str, path: str) -> tuple[dict[str, Any], str, str, Any]:
  """(the checkpoint's config.json, Tunix's package, its loader module, the key map)."""
  try:
    with open(os.path.join(path, "config.json")) as f:
      hf = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"model {name!r}: no readable config.json in {path}: {e}") from None
  family, loader, key_map = FAMILIES.get(hf.get("model_type"), (None, None, None))
  if family is None:
    raise ValueError(
      f"model {name!r} is a {hf.get('model_type')!r}; Tunix runs "
      f"{sorted(FAMILIES)} here (model.library: transformers runs the rest)"
    )
  return hf, family, loader, key_map


def model_config(family: str, hf: dict[str, Any], path: str) -> Any:
  """Tunix's ``ModelConfig`` for ``family`` from a Hugging Face ``config.json`` (``hf``, read
  from ``path``); a ValueError where Tunix would compute other logits than the checkpoint."""
  module = __import__(f"tunix.models.{family}.model", fromlist=["ModelConfig"])
  theta = hf.get("rope_theta", 10_000.0)

  def refuse(field: str, why: str) -> ValueError:
    return ValueError(
      f"{path}/config.json: {field}={hf.get(field)!r}, but Tunix's {family} {why}; its logits "
      "would differ from the checkpoint's"
    )

  if family == "qwen3" and theta != 1e6:
    raise refuse("rope_theta", "uses 1e6 only")  # tunix 0.1.7's Qwen3 ignores the config's
  if hf.get("rope_scaling"):
    raise refuse("rope_scaling", "does not read it here")
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  sizes = dict(
    num_layers=hf["num_hidden_layers"],
    embed_dim=hf["hidden_size"],
    hidden_dim=hf["intermediate_size"],
    num_heads=heads,
    head_dim=head_dim,
    num_kv_heads=hf.get("num_key_value_heads", heads),
  )
  if family == "gemma3":
    return module.ModelConfig(**sizes, **_gemma3(module, hf, head_dim, refuse))
  tied = bool(hf.get("tie_word_embeddings", False))
  sizes["use_tied_embedding" if family == "qwen3" else "weight_tying"] = tied
  return module.ModelConfig(
    **sizes,
    vocab_size=hf["vocab_size"],
    rope_theta=int(theta),
    norm_eps=hf.get("rms_norm_eps", 1e-6),
  )


def _gemma3(module: Any, hf: dict[str, Any], head_dim: int, refuse) -> dict[str, Any]:
  """Gemma 3's fields of Tunix's config; what Tunix's Gemma 3 fixes must be what it computes."""
  scalar = hf.get("query_pre_attn_scalar", head_dim)
  norms = module.QueryPreAttentionNormalisation
  by = {
    head_dim: norms.BY_ONE_OVER_SQRT_HEAD_DIM,
    hf["hidden_size"] // hf["num_attention_heads"]: norms.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS,
  }
  if scalar not in by:
    raise refuse("query_pre_attn_scalar", f"scales queries by head_dim ({head_dim}) only")
  if not hf.get("tie_word_embeddings", True):
    raise refuse("tie_word_embeddings", "decodes with its input embedding")
  if hf.get("rms_norm_eps", 1e-6) != 1e-6:
    raise refuse("rms_norm_eps", "uses 1e-6")
  for field in ("final_logit_softcapping", "attn_logit_softcapping"):
    if hf.get(field) is not None:
      raise refuse(field, "does not cap logits")
  pattern = [p.name for p in module.GEMMA3_ATTENTION_PATTERN]
  want = ["full_attention" if p == "GLOBAL" else "sliding_attention" for p in pattern]
  layers = hf.get("layer_types") or []
  if layers != [want[i % len(want)] for i in range(len(layers))]:
    raise refuse("layer_types", f"repeats {want}")
  return dict(
    num_embed=hf["vocab_size"],
    sliding_window_size=hf.get("sliding_window"),
    local_base_frequency=int(hf.get("rope_local_base_freq", 10_000)),
    global_base_frequency=int(hf.get("rope_theta", 1_000_000)),
    query_pre_attn_norm=by[scalar],
    param_dtype=jnp.float32,
  )


def load(exp: Experiment) -> tuple[Any, Any, str]:
  """(the Tunix model, its key map, the checkpoint directory)."""
  path = _checkpoint(exp.model.name, exp.model.revision)
  hf, family, loader, key_map = _family(exp.model.name, path)
  params = _tunix(family, loader)
  dtype = jnp.bfloat16 if exp.train.compute_dtype == "bfloat16" else None
  model = params.create_model_from_safe_tensors(path, model_config(family, hf, path), dtype=dtype)
  return model, key_map, path


def shapes(name: str, revision: str | None = None) -> tuple[Any, str]:
  """Tunix's model of checkpoint ``name`` with its shapes but no weights (only config.json is
  read, or downloaded), and its Hugging Face model_type: what ``suggest-block-size`` needs."""
  from flax import nnx

  path = _checkpoint(name, revision, files="config.json")
  hf, family, _, _ = _family(name, path)
  cls = getattr(_tunix(family, "model"), CLASSES[family])
  config = model_config(family, hf, path)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(params=0))))
  # c3a reads each layer's kernel through its value: a zero-strided view of one zero holds none
  # of a real checkpoint's memory.
  state = jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), state)
  return nnx.merge(graphdef, state), hf["model_type"]


def job(exp: Experiment, log: Log = print) -> Job:
  """The causal LM job of :func:`c3a_jax.cli.hub.job`, on a Tunix model."""
  import transformers
  from flax import nnx

  model, key_map, path = load(exp)
  log(f"model: Tunix {type(model).__name__} from {path}")
  spec = exp.data
  train = hub._limit(hub.load_split(spec, spec.train_split), spec.max_train_examples)
  evals = hub._limit(hub.load_split(spec, spec.eval_split), spec.max_eval_examples)
  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
  train_data = hub._text(spec, train, spec.train_split, tokenizer, True)
  quantized = None
  if exp.model.quantize is not None:
    model, quantized = quantize(exp, model, {k: v[:1] for k, v in train_data.items()})
    log(f"base: {quantized}")
  graphdef, state = nnx.split(model)

  def build(params):
    m = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))  # fresh Variables, this trace's
    c3a.set_nnx_params(m, params)  # every nnx.Param from the params (C3A kernels attach)
    return m

  def logits_fn(params, batch, rng, train):
    return build(params)(*_inputs(batch))[0]

  def attach(params, cfg, rng):
    return c3a.nnx_params(c3a.attach(build(params), cfg, rng))

  return Job(
    logits_fn=logits_fn,
    params=jax.tree.map(jnp.asarray, c3a.nnx_params(model)),
    train_data=train_data,
    eval_data=hub._text(spec, evals, spec.eval_split, tokenizer, True)
    if evals is not None
    else None,
    kind="lm",
    tokens_per_example=spec.max_length,
    attach=attach,
    key_map=key_map,
    base_checkpoint=path,
    quantized=quantized,
  )


def _inputs(batch: dict[str, Any]) -> tuple:
  """The model's arguments for ``batch``: tokens, positions, no cache, the causal mask."""
  tokens, valid = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"], bool)
  t = tokens.shape[1]
  positions = jnp.broadcast_to(jnp.arange(t), tokens.shape)
  mask = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]
  return tokens, positions, None, mask


def quantize(exp: Experiment, model: Any, example: dict[str, Any]) -> tuple[Any, str]:
  """(a copy of the Tunix ``model`` whose weights ``model.quantize`` names Qwix quantized, how,
  in words); ``example`` is a batch Qwix runs the model on once, to find its layers."""
  spec = exp.model.quantize
  with quantize_errors(spec):
    quantized = c3a.quantize.quantize_nnx(
      model,
      *_inputs(example),
      weights=spec.weights,
      tile_size=spec.tile_size,
      module_path=quantize_rule(exp),
    )
  return quantized, describe_quantized(exp, c3a.nnx_params(quantized))
