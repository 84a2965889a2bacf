"""C3A adapters as LoRA adapters, for serving stacks that take LoRA only.

Each C3A layer's weight change is a dense ``(d_in, d_out)`` matrix (``ops.delta_weight``), of
rank up to ``min(d_in, d_out)``: C3A's point is a high-rank update. :func:`to_lora` gives each
layer the rank-``r`` factors closest to it in Frobenius norm (a truncated SVD, Eckart-Young),
``lora_a @ lora_b ~ delta``, and each layer's relative error ``||delta - lora_a @ lora_b||_F /
||delta||_F``: 0 at full rank, larger as ``r`` falls. ``c3a.save_adapter(dir, params, cfg,
as_lora=r)`` writes them as a PEFT LoRA adapter (``lora_A``/``lora_B``, ``lora_alpha = r``).

The SVD is exact and cheap because the delta is block-circulant: the DFT diagonalises every
``b x b`` block at once, so the delta is, up to unitary maps, ``b`` matrices of shape ``(m, n)``
(one per frequency), and its singular values are theirs. ``b // 2 + 1`` float64 SVDs of
``(m, n)`` matrices replace one of ``(d_out, d_in)``: for a 4096 x 11008 layer at block size 128,
65 SVDs of 86 x 32 matrices instead of one of 11008 x 4096.

One rank for all layers, as serving stacks take it (``r`` and ``--max-lora-rank`` in vLLM): a
layer whose full rank ``min(d_in, d_out)`` is below ``r`` gets zero columns past it (it is
exact), and an ``r`` above every layer's full rank is an error naming the largest useful one.

Example:
  >>> import jax, jax.numpy as jnp, c3a_jax as c3a
  >>> params = {"layer": {"query": {"kernel": jnp.ones((8, 8))}}}
  >>> cfg = c3a.C3AConfig(block_size=4, target_modules=["query"], init_weights="gaussian")
  >>> params = c3a.attach(params, cfg, jax.random.key(0))
  >>> lora = c3a.to_lora(params, rank=8)   # full rank: exact
  >>> f = lora.factors["layer"]["query"]
  >>> f["lora_a"].shape, f["lora_b"].shape
  ((8, 8), (8, 8))
  >>> delta = c3a.ops.delta_weight(params["layer"]["query"]["c3a_kernel"])
  >>> bool(jnp.allclose(f["lora_a"] @ f["lora_b"], delta, atol=1e-6))
  True
  >>> lora.errors
  {'layer.query': 0.0}
  >>> 0 < c3a.to_lora(params, rank=2).errors["layer.query"] < 1
  True
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from c3a_jax import _nnx, _tree
from c3a_jax._config import C3AConfig
from c3a_jax._layout import C3A_LEAVES
from c3a_jax._targets import layer_path
from c3a_jax._tree import Params
from c3a_jax.io import brief
from c3a_jax.ops import kernel_shape

# A relative error above this is a served model that differs from the trained one: warn.
LOSSY = 1e-3


class LoraExport(NamedTuple):
  """What :func:`to_lora` returns.

  Attributes:
    factors: a tree mirroring the adapter: each C3A layer's module holds ``lora_a``
      ``(d_in, r)`` and ``lora_b`` ``(r, d_out)`` (float32; ``(L, d_in, r)`` and ``(L, r, d_out)``
      for a stack of ``L``), with ``x @ lora_a @ lora_b`` the layer's delta applied to ``x`` (a
      multi-axis layer's ``d_in``, ``d_out`` flattened, as its torch ``Linear``).
    errors: ``{layer path: relative error}``, a stack's layers each by the name PEFT gives them
      (``layers.attn.q`` -> ``layers.0.attn.q``, ...).

  :meth:`describe` says the errors in one line; for the errors
  ``c3a.save_adapter(..., as_lora=r)`` returns, ``c3a.LoraExport({}, errors).describe()``.
  """

  factors: Params
  errors: dict[str, float]

  def describe(self) -> str:
    """One line: the largest relative error and its layer, and the mean over the layers.

    Example:
      >>> import c3a_jax as c3a
      >>> c3a.LoraExport({}, {"layer.query": 0.25, "layer.value": 0.75}).describe()
      "relative error max 0.75 (layer 'layer.value'), mean 0.5 over 2 layers"
    """
    return describe(self.errors)


class Factors(NamedTuple):
  """One layer's LoRA: ``a`` ``(d_in, rank)``, ``b`` ``(rank, d_out)``, float32; the relative
  error; the layer's full rank ``min(d_in, d_out)``."""

  a: np.ndarray
  b: np.ndarray
  error: float
  full_rank: int


def check_rank(rank: Any, where: str) -> int:
  """``rank`` as an int; a ValueError naming ``where`` unless it is a positive integer."""
  if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
    raise ValueError(f"{where}: the LoRA rank must be a positive integer, got {brief(rank)}")
  return int(rank)


def check_useful(rank: int, full_ranks: Sequence[int], where: str) -> None:
  """Refuses a rank above every layer's full rank: it would store only zeros past it."""
  if full_ranks and rank > max(full_ranks):
    raise ValueError(
      f"{where}: rank {rank} is above every layer's full rank min(d_in, d_out); rank "
      f"{max(full_ranks)} is the largest useful one (exact for every layer)"
    )


def factorize(w: Any, rank: int) -> Factors:
  """The best rank-``rank`` LoRA of C3A kernel ``w`` ``(m, n, b)``: ``a @ b`` is the matrix of
  rank ``rank`` closest to ``ops.delta_weight(w)``; zero columns past the layer's full rank."""
  m, n, b = kernel_shape(w, "to_lora")
  w = np.asarray(w, np.float64)
  # In PyTorch's (out, in) layout block (i, j) of the delta is circulant with first row
  # w[i, j] / d_in, so it is F^H diag(lam[i, j]) F with F the unitary DFT and
  # lam[i, j, k] = conj(fft(w[i, j]))[k] / d_in. Grouped by frequency k the delta is block
  # diagonal with blocks lam[:, :, k] (m, n); each singular triplet (s, p, q) of a block is one
  # of the delta's: (s, p kron f_k, q kron f_k), f_k[r] = exp(2 pi i k r / b) / sqrt(b).
  lam = np.conj(np.fft.rfft(w, axis=-1)) / (n * b)
  svds, keys = [], []
  for k in range(b // 2 + 1):
    real = k == 0 or 2 * k == b  # self-conjugate frequencies: real blocks, real vectors
    block = lam[:, :, k].real if real else lam[:, :, k]
    p, s, qh = np.linalg.svd(block, full_matrices=False)
    svds.append((p, qh.conj().T))
    # Frequencies k and b - k are conjugate: their two complex triplets are two real ones,
    # sqrt(2) (Re p_k, Re q_k) and sqrt(2) (Im p_k, Im q_k), with the same s.
    for part in (0,) if real else (1, 2):
      keys.append(np.stack([s, np.full(s.shape, k), np.arange(len(s)), np.full(s.shape, part)]))
  s, ks, ts, parts = np.concatenate(keys, axis=1)
  order = np.lexsort((parts, ts, ks, -s))  # largest first; ties in a fixed order
  keep, drop = order[:rank], order[rank:]
  total = float(np.sum(s**2))
  error = float(np.sqrt(np.sum(s[drop] ** 2) / total)) if total > 0 else 0.0
  out_vecs = np.zeros((m * b, rank))
  in_vecs = np.zeros((n * b, rank))
  chosen = ks[keep]
  for k in np.unique(chosen).astype(int):
    at = np.nonzero(chosen == k)[0]  # where this frequency's triplets go among the columns
    cols = keep[at]
    p, q = svds[k]
    t = ts[cols].astype(int)
    f = np.exp(2j * np.pi * k * np.arange(b) / b) / np.sqrt(b)
    # (m, t) x (b,) -> (m * b, t): row i * b + r is p[i, t] * f_k[r].
    u = (p[:, None, t] * f[None, :, None]).reshape(m * b, len(t))
    v = (q[:, None, t] * f[None, :, None]).reshape(n * b, len(t))
    scale = np.where(parts[cols] == 0, 1.0, np.sqrt(2))
    imag = parts[cols] == 2
    out_vecs[:, at] = np.where(imag, u.imag, u.real) * scale
    in_vecs[:, at] = np.where(imag, v.imag, v.real) * scale
  root = np.sqrt(np.concatenate([s[keep], np.zeros(rank - len(keep))]))
  # Singular values split as square roots into both factors: neither holds the whole scale.
  return Factors(
    (in_vecs * root).astype(np.float32),
    (out_vecs * root).T.astype(np.float32),
    error,
    min(m, n) * b,
  )


def to_lora(adapter: Any, rank: int, cfg: C3AConfig | None = None) -> LoraExport:
  """Each C3A layer's delta as its best rank-``rank`` LoRA, and each layer's relative error.

  ``adapter`` is what :func:`c3a_jax.save_adapter` takes: a params tree, an adapter from
  :func:`c3a_jax.split`, or an adapted NNX model; only its C3A kernels count. A stacked kernel
  ``(L, m, n, b)`` gives stacked factors. ``cfg`` only names a stack's layers (its
  ``layers_pattern``, as :func:`c3a_jax.save_adapter` does); without it the index follows the
  path's first segment.

  Raises:
    ValueError: ``rank`` is not a positive integer or is above every layer's full rank
      ``min(d_in, d_out)``, a kernel has more than one stack axis, or there is no C3A kernel.
  """
  rank = check_rank(rank, "to_lora")
  if _nnx.is_module(adapter):
    adapter = _nnx.view(adapter).tree
  if not isinstance(adapter, Mapping):
    raise TypeError(
      f"to_lora: expected a params tree, an adapter or an NNX model, got {type(adapter).__name__}"
    )
  names = cfg or C3AConfig()
  factors: Params = {}
  errors: dict[str, float] = {}
  full_ranks = []
  for path, name, value in _tree.leaves(adapter):
    if name not in C3A_LEAVES:
      continue
    w = np.asarray(_tree.unbox(value))
    if w.ndim == 3:
      layers = [(path, factorize(w, rank))]
    elif w.ndim == 4:
      layers = [(layer_path(path, i, names), factorize(wi, rank)) for i, wi in enumerate(w)]
    else:
      raise ValueError(
        f"to_lora: {path}.{name} has shape {w.shape}; a C3A kernel is (m, n, b), or "
        "(L, m, n, b) for a stack along one axis"
      )
    for layer, f in layers:
      errors[layer] = f.error
      full_ranks.append(f.full_rank)
    stack = (lambda xs: np.stack(xs)) if w.ndim == 4 else (lambda xs: xs[0])
    # device_put, not jnp.asarray: that compiles a copy for every new shape.
    _tree.set_leaf(factors, path, "lora_a", jax.device_put(stack([f.a for _, f in layers])))
    _tree.set_leaf(factors, path, "lora_b", jax.device_put(stack([f.b for _, f in layers])))
  if not errors:
    raise ValueError("to_lora: the adapter holds no c3a_kernel; call c3a.attach first")
  check_useful(rank, full_ranks, "to_lora")
  return LoraExport(factors, errors)


def lora_config(cfg: C3AConfig, rank: int, targets: Sequence[str]) -> dict[str, Any]:
  """adapter_config.json of the LoRA adapter: the fields PEFT's ``LoraConfig`` reads (and the
  ones serving stacks read), with ``targets`` the PEFT names of the adapted layers."""
  return {
    "peft_type": "LORA",
    "task_type": cfg.task_type,
    "base_model_name_or_path": cfg.base_model_name_or_path,
    "revision": None,
    "inference_mode": True,
    "r": rank,
    # PEFT scales B @ A by lora_alpha / r: 1 here, as the factors hold the delta's scale.
    "lora_alpha": rank,
    "use_rslora": False,  # which would scale by lora_alpha / sqrt(r)
    "use_dora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    # Every layer by its full name: PEFT adapts exactly these, as it adapted the C3A ones.
    "target_modules": list(targets),
    "layers_to_transform": None,
    "layers_pattern": None,
    "lora_dropout": 0.0,
    "fan_in_fan_out": False,
    "bias": {"c3a_only": "lora_only"}.get(cfg.bias, cfg.bias),
    "modules_to_save": list(cfg.modules_to_save) if cfg.modules_to_save else None,
    "init_lora_weights": True,
  }


def describe(errors: Mapping[str, float]) -> str:
  """One line: the largest relative error and its layer, and the mean."""
  worst = max(errors, key=errors.__getitem__)
  mean = sum(errors.values()) / len(errors)
  return (
    f"relative error max {errors[worst]:.4g} (layer {worst!r}), mean {mean:.4g} over "
    f"{len(errors)} layers"
  )


def warn_lossy(errors: Mapping[str, float], rank: int, where: str) -> None:
  """A warning naming the worst layer where a layer loses more than ``LOSSY`` of its delta."""
  lossy = sum(e > LOSSY for e in errors.values())
  if lossy:
    warnings.warn(
      f"{where}: the rank-{rank} LoRA differs from the C3A adapter in {lossy} of {len(errors)} "
      f"layers by more than {LOSSY:g}: {describe(errors)}. A higher rank loses less; "
      "min(d_in, d_out) is exact",
      stacklevel=3,
    )
