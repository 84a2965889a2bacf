"""Choosing a block size: the divisors of the targeted layers near a LoRA rank's budget.

LoRA of rank ``r`` on a ``(d_in, d_out)`` layer trains ``r * (d_in + d_out)`` parameters; C3A
with block size ``b`` trains ``d_in * d_out / b``. So a block size near
``d_in * d_out / (r * (d_in + d_out))`` (about ``sqrt(d_in * d_out) / (2 r)``) matches rank
``r``'s parameter count, and C3A's update still has full rank.

Example:
  >>> import numpy as np
  >>> from c3a_jax.cli.blocks import suggest
  >>> params = {"q": {"kernel": np.zeros((768, 768))}, "v": {"kernel": np.zeros((768, 768))}}
  >>> rows = suggest(params, ["q", "v"], rank=8)
  >>> [(r.block_size, r.c3a_params, r.lora_params) for r in rows if r.closest]
  [(48, 24576, 24576)]
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import c3a_jax as c3a


@dataclasses.dataclass(frozen=True)
class Choice:
  block_size: int
  c3a_params: int
  lora_params: int
  closest: bool  # the divisor whose parameter count is nearest LoRA's


def suggest(
  params: Mapping,
  target_modules: Sequence[str] | str,
  rank: int = 8,
  *,
  model_type: str | None = None,
  around: int = 4,
) -> list[Choice]:
  """Block sizes dividing every targeted layer, ``around`` on each side of LoRA-``rank``'s
  budget."""
  if rank < 1:
    raise ValueError(f"rank must be a positive integer, got {rank}")
  targets = c3a.select(
    params, c3a.C3AConfig(block_size=1, target_modules=target_modules), model_type=model_type
  )
  g = 0
  for t in targets:
    g = math.gcd(g, math.gcd(t.d_in, t.d_out))
  divisors = [d for d in range(1, g + 1) if g % d == 0]
  lora = rank * sum(t.d_in + t.d_out for t in targets)
  cost = lambda b: sum(t.d_in * t.d_out // b for t in targets)
  best = min(divisors, key=lambda b: (abs(math.log(cost(b) / lora)), b))
  i = divisors.index(best)
  return [
    Choice(b, cost(b), lora, b == best) for b in divisors[max(0, i - around) : i + around + 1]
  ]


def report(
  model: str,
  *,
  rank: int = 8,
  target_modules: str | None = None,
  from_pt: bool = False,
  library: str | None = None,
) -> str:
  """The CLI's table for a hub model, a local model directory, or ``"digits"``.

  ``library`` is ``train``'s ``model.library``: ``"transformers"`` (Flax models) or ``"tunix"``
  (NNX LLMs); None picks Tunix for a model type that transformers has no Flax model of.
  """
  if model == "digits":
    from c3a_jax.cli import digits

    log = lambda line: print(line, file=sys.stderr)  # a damaged cache's warning, too
    params, model_type = digits.pretrained_params(log=log), None
    targets = target_modules.split(",") if target_modules else ["fc0", "fc1"]
  else:
    params, model_type = _model(model, from_pt, library)
    targets = target_modules.split(",") if target_modules else None
  if targets is None:
    try:
      targets = list(c3a.default_targets(model_type))
    except ValueError:
      raise ValueError(
        f"no default targets for model type {model_type!r}; pass --target-modules"
      ) from None
  rows = suggest(params, targets, rank, model_type=model_type)
  lines = [
    f"targets: {targets}; LoRA rank {rank} trains {rows[0].lora_params:,} parameters",
    f"{'block size':>10} {'C3A params':>12} {'vs LoRA':>8}",
  ]
  lines += [
    f"{r.block_size:>10} {r.c3a_params:>12,} {r.c3a_params / r.lora_params:>8.2f}"
    + ("  <- closest" if r.closest else "")
    for r in rows
  ]
  return "\n".join(lines)


def _model(name: str, from_pt: bool, library: str | None) -> tuple[Any, str]:
  """(params, or an NNX model, and its model_type) as ``train`` would run model ``name``."""
  import transformers
  from transformers.models.auto.modeling_flax_auto import FLAX_MODEL_MAPPING_NAMES

  from c3a_jax.cli import hub, tunix

  hub.check_local(name, "MODEL", "model")
  if not os.path.exists(name):
    hub.offline_if_unreachable()
  model_type = _model_type(name)
  flax = model_type is None or model_type in FLAX_MODEL_MAPPING_NAMES
  if library == "tunix" or (library is None and not flax and model_type in tunix.FAMILIES):
    return tunix.shapes(name)  # sizes only: no weights are read
  if not flax:
    raise ValueError(
      f"model {name!r} is a {model_type!r}, which transformers has no Flax model of (Tunix "
      f"runs {sorted(tunix.FAMILIES)} with --library tunix)"
    )
  try:
    m = transformers.FlaxAutoModel.from_pretrained(name, from_pt=from_pt)
  except (OSError, ValueError) as e:
    raise ValueError(
      f"could not load model {name!r} ({hub._offline_hint(name)}): {str(e).splitlines()[0]}"
    ) from None
  return m.params, m.config.model_type


def _model_type(name: str) -> str | None:
  """The checkpoint's model_type, from its config.json; None where it does not read (loading
  the model then says why)."""
  import transformers

  try:
    return transformers.AutoConfig.from_pretrained(name).model_type
  except (OSError, ValueError):
    return None
