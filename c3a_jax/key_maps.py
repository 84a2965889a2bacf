"""Key maps: from a JAX model's dotted module paths to PEFT's module names.

A key map is a sequence of ``(regex, replacement)`` pairs, applied in order with ``re.sub``
to the model's module path; the result is PEFT's module name without ``base_model.model.``.
:func:`c3a_jax.save_adapter` and :func:`c3a_jax.load_adapter` take one as ``key_map=``, so an
adapter trained on a JAX model loads with PEFT on the Hugging Face PyTorch model, and back.

A replacement may be a tuple of names, for a layer that fuses several PyTorch ``Linear``
layers along its output (Tunix Gemma 3's ``kv_einsum`` holds ``k_proj`` and ``v_proj``): the
layer's output rows split into that many equal, contiguous parts, in order, and each part's
C3A kernel is the matching rows of block rows of the layer's, which is exact. The block size
must divide each part's width.

A layer of a stack (``nn.scan``) is named per layer before the map applies: its index ``i``
is inserted as a path segment after the segment ``C3AConfig.layers_pattern`` names
(``"layers.attn.q"`` with ``layers_pattern="layers"`` gives ``"layers.3.attn.q"``), or after
the first segment without ``layers_pattern``.

The maps shipped here are for Tunix's NNX Qwen 3, Llama 3 and Gemma 3. Their layers are
``layers.<i>.attn.*`` and ``layers.<i>.mlp.*``, Hugging Face's ``model.layers.<i>.self_attn.*``
and ``model.layers.<i>.mlp.*``; Gemma 3 names its attention einsums ``q_einsum``,
``kv_einsum`` (or ``qkv_einsum`` when every head has its own keys) and ``attn_vec_einsum``.

Example:
  >>> from c3a_jax import key_maps
  >>> key_maps.apply(key_maps.TUNIX_QWEN3, "layers.3.attn.q_proj")
  ('model.layers.3.self_attn.q_proj',)
  >>> key_maps.apply(key_maps.TUNIX_GEMMA3, "layers.3.attn.kv_einsum")
  ('model.layers.3.self_attn.k_proj', 'model.layers.3.self_attn.v_proj')
"""

from __future__ import annotations

import re
from collections.abc import Sequence

KeyMap = Sequence[tuple[str, str | tuple[str, ...]]]

_TUNIX_DECODER: tuple[tuple[str, str], ...] = (
  (r"^layers\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
  (r"^layers\.(\d+)\.mlp\.", r"model.layers.\1.mlp."),
)
TUNIX_QWEN3: KeyMap = _TUNIX_DECODER
TUNIX_LLAMA3: KeyMap = _TUNIX_DECODER
_ATTN = r"model.layers.\1.self_attn."
TUNIX_GEMMA3: KeyMap = (
  (r"^layers\.(\d+)\.attn\.q_einsum$", _ATTN + "q_proj"),
  (r"^layers\.(\d+)\.attn\.kv_einsum$", (_ATTN + "k_proj", _ATTN + "v_proj")),
  (r"^layers\.(\d+)\.attn\.qkv_einsum$", (_ATTN + "q_proj", _ATTN + "k_proj", _ATTN + "v_proj")),
  (r"^layers\.(\d+)\.attn\.attn_vec_einsum$", _ATTN + "o_proj"),
  (r"^layers\.(\d+)\.mlp\.", r"model.layers.\1.mlp."),
)

__all__ = ["TUNIX_GEMMA3", "TUNIX_LLAMA3", "TUNIX_QWEN3", "KeyMap", "apply", "check"]


def check(key_map: KeyMap | None, where: str) -> tuple[tuple[str, str | tuple[str, ...]], ...]:
  """``key_map`` as a tuple of checked pairs; a ValueError naming ``where`` if bad."""
  if key_map is None:
    return ()
  pairs = []
  for i, pair in enumerate(key_map):
    ok = isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)
    replacement = pair[1] if ok else None
    if isinstance(replacement, (tuple, list)):
      ok = len(replacement) > 0 and all(isinstance(r, str) for r in replacement)
      replacement = tuple(replacement)
    if not (ok and isinstance(replacement, (str, tuple))):
      raise ValueError(
        f"{where}: key_map entry {i} is {pair!r}; each entry is a (regex, replacement) "
        "pair of strings, or (regex, tuple of replacements) for a layer that splits"
      )
    try:
      re.compile(pair[0])
    except re.error as e:
      raise ValueError(f"{where}: key_map entry {i}: {pair[0]!r} is not a regex ({e})") from None
    pairs.append((pair[0], replacement))
  return tuple(pairs)


def apply(key_map: KeyMap | None, path: str) -> tuple[str, ...]:
  """PEFT's names for module ``path``: one, or several where a rule splits the layer.

  Every pair of ``key_map`` applies in order (``re.sub``); a pair whose replacement is a
  tuple turns each name it matches into one name per replacement.
  """
  names = [path]
  for pattern, replacement in key_map or ():
    parts = (replacement,) if isinstance(replacement, str) else replacement
    split = []
    for name in names:
      if re.search(pattern, name):
        split.extend(re.sub(pattern, r, name) for r in parts)
      else:
        split.append(name)
    names = split
  return tuple(names)
