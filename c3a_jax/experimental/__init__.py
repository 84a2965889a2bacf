"""What is not yet measured to win, kept tested until it is.

* :mod:`c3a_jax.experimental.pallas`: C3A as one fused Pallas kernel per pass, for GPU and
  TPU (interpret mode on CPU).
"""
