"""What :func:`c3a_jax.merge` merged: each kernel it returned -> the C3A kernel merged into it.

``unmerge`` reads it to refuse subtracting another adapter, or subtracting from params that were
never merged, either of which would give wrong weights without a sign. Entries are keyed by the
merged array's identity and held weakly, so one lives as long as its kernel does; a transpose
that only relays a kernel out (an NNX einsum's view) carries the entry over.

Example:
  >>> import jax.numpy as jnp
  >>> from c3a_jax import _merge_record
  >>> merged, w = jnp.ones((4, 4)), jnp.ones((1, 1, 4))
  >>> _merge_record.remember(merged, w)
  >>> _merge_record.merged_with(merged) is w, _merge_record.merged_with(jnp.ones((4, 4)))
  (True, None)
"""

from __future__ import annotations

import weakref
from typing import Any

import jax

_MERGED: dict[int, tuple[weakref.ref, jax.Array]] = {}


def remember(merged: jax.Array, c3a_kernel: jax.Array) -> None:
  """Records that ``merged`` is a kernel with ``c3a_kernel`` merged in."""
  key = id(merged)
  _MERGED[key] = (weakref.ref(merged, lambda _: _MERGED.pop(key, None)), c3a_kernel)


def merged_with(kernel: Any) -> jax.Array | None:
  """The C3A kernel merged into ``kernel``, or None if :func:`remember` did not record it."""
  entry = _MERGED.get(id(kernel))
  return entry[1] if entry is not None and entry[0]() is kernel else None


def carry(source: Any, relaid: Any) -> Any:
  """``relaid`` (``source`` transposed), recorded as merged with what ``source`` was."""
  c3a_kernel = merged_with(source)
  if c3a_kernel is not None:
    remember(relaid, c3a_kernel)
  return relaid
