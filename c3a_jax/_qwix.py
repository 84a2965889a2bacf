"""A frozen base quantized by Qwix (QC3A): what the rest of c3a-jax needs to know about it.

Qwix's post-training quantization (``qwix.PtqProvider``) stores a layer's weight as a
``WithAux`` holding a ``QArray`` (integer values and their scales) and, while the quantized
model runs, intercepts ``jnp.einsum`` / ``lax.dot_general`` in the layers its rules match, so
that their products are Qwix's. C3A keeps to two rules over such a base:

* its delta is computed outside Qwix's interception (:func:`outside`): Qwix would otherwise
  take C3A's own einsums, inside the layer's call, for the layer's, and refuse or quantize them;
* nothing folds into a quantized kernel (:func:`is_quantized`, :func:`quantizing`): the delta
  would be rounded to the kernel's 8 or 4 bits, or lost.

Qwix is never imported here for a model that does not use it: c3a reads Qwix only once the
user's program has imported it (``sys.modules``). The names it reads
(``qwix._src.interception.disable_interceptions``, ``qwix._src.qconfig.get_current_rule``)
are Qwix 0.1's, which exports no public equivalent; the ``[tunix]`` extra pins that range.

Example:
  >>> import jax.numpy as jnp
  >>> is_quantized(jnp.ones((4, 4))), quantizing()
  (False, False)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def is_quantized(x: Any) -> bool:
  """Whether ``x`` is a weight Qwix quantized (a ``WithAux`` or a ``QArray``)."""
  cls = type(x)
  return cls.__module__.startswith("qwix.") and cls.__name__ in ("WithAux", "QArray")


def qtype(x: Any) -> str:
  """How a quantized weight is stored, for messages: e.g. ``"int8"``, ``"nf4 (tiles {0: 32})"``
  (Qwix's tiled axes and their tile sizes)."""
  how = getattr(x, "how", None)
  name = getattr(how, "qtype", None) or getattr(getattr(x, "array", x), "qtype", "quantized")
  name = getattr(name, "__name__", None) or getattr(name, "name", None) or str(name)
  tiles = dict(getattr(how, "tiled_axes", None) or {})
  return f"{name} (tiles {tiles})" if tiles else name


def quantizing() -> bool:
  """Whether Qwix quantizes the products of the layer now being called."""
  if sys.modules.get("qwix") is None:
    return False
  from qwix._src import qconfig

  return qconfig.get_current_rule("dot_general") is not None


def outside(fn: F) -> F:
  """``fn`` run with Qwix's interception off (``fn`` itself where Qwix is not in use)."""
  if sys.modules.get("qwix") is None:
    return fn
  from qwix._src.interception import disable_interceptions

  return disable_interceptions(fn)
