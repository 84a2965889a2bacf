"""Key maps: from a JAX model's dotted module paths to PEFT's module names.

A key map is a sequence of ``(regex, replacement)`` pairs, applied in order with ``re.sub``
to the model's module path; the result is PEFT's module name without ``base_model.model.``.
:func:`c3a_jax.save_adapter` and :func:`c3a_jax.load_adapter` take one as ``key_map=``, so an
adapter trained on a JAX model loads with PEFT on the Hugging Face PyTorch model, and back.

A layer of a stack (``nn.scan``) is named per layer before the map applies: its index ``i``
is inserted as a path segment after the segment ``C3AConfig.layers_pattern`` names
(``"layers.attn.q"`` with ``layers_pattern="layers"`` gives ``"layers.3.attn.q"``), or after
the first segment without ``layers_pattern``.

The maps shipped here are for Tunix's NNX Qwen 3 and Llama 3, whose attention is
``layers.<i>.attn.<q|k|v|o>_proj`` and MLP ``layers.<i>.mlp.<gate|up|down>_proj``: Hugging
Face's ``model.layers.<i>.self_attn.*`` and ``model.layers.<i>.mlp.*``.

Example:
  >>> from c3a_jax import key_maps
  >>> key_maps.apply(key_maps.TUNIX_QWEN3, "layers.3.attn.q_proj")
  'model.layers.3.self_attn.q_proj'
"""

from __future__ import annotations

import re
from collections.abc import Sequence

KeyMap = Sequence[tuple[str, str]]

_TUNIX_DECODER: tuple[tuple[str, str], ...] = (
  (r"^layers\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
  (r"^layers\.(\d+)\.mlp\.", r"model.layers.\1.mlp."),
)
TUNIX_QWEN3: KeyMap = _TUNIX_DECODER
TUNIX_LLAMA3: KeyMap = _TUNIX_DECODER

__all__ = ["TUNIX_LLAMA3", "TUNIX_QWEN3", "KeyMap", "apply", "check"]


def check(key_map: KeyMap | None, where: str) -> tuple[tuple[str, str], ...]:
  """``key_map`` as a tuple of compiled-checked pairs; a ValueError naming ``where`` if bad."""
  if key_map is None:
    return ()
  pairs = []
  for i, pair in enumerate(key_map):
    if not (
      isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)
    ):
      raise ValueError(
        f"{where}: key_map entry {i} is {pair!r}; each entry is a (regex, replacement) "
        "pair of strings"
      )
    try:
      re.compile(pair[0])
    except re.error as e:
      raise ValueError(f"{where}: key_map entry {i}: {pair[0]!r} is not a regex ({e})") from None
    pairs.append((pair[0], pair[1]))
  return tuple(pairs)


def apply(key_map: KeyMap | None, path: str) -> str:
  """``path`` mapped by every pair of ``key_map`` in order (``re.sub``)."""
  for pattern, replacement in key_map or ():
    path = re.sub(pattern, replacement, path)
  return path
