"""What ``c3a.intercept()`` has set for the code it runs: whether it is active, the strategy,
and each row's adapter when a batch mixes adapters.

Kept apart from the linen interceptor so that NNX layers, which need no interceptor, read the
same strategy.
"""

from __future__ import annotations

import contextvars

active = contextvars.ContextVar("c3a_intercept_active", default=False)
strategy = contextvars.ContextVar("c3a_intercept_strategy", default="auto")
adapter_index = contextvars.ContextVar("c3a_intercept_adapter_index", default=None)
