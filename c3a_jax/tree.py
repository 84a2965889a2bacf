"""A params tree as c3a_jax reads it: which leaves are C3A kernels, and Flax boxes.

For code that walks params, adapters or optimizer state itself (sharding rules, dtype casts, as
:mod:`c3a_jax.training` does): :data:`C3A_LEAVES` are the names of C3A kernel leaves
(``c3a_kernel_out_in`` on a layer that stores its kernel ``(out, in)``, GPT-2's Conv1D). A Flax
box (``nn.Partitioned``, ``nn.LogicallyPartitioned``) is one leaf: :func:`is_box` tells one,
:func:`unbox` reads the array inside, :func:`rebox` puts a new value in the same box (names
and all), as :func:`c3a_jax.attach`, :func:`c3a_jax.merge` and
:func:`c3a_jax.training.param_shardings` keep boxes. A weight Qwix quantized
(:mod:`c3a_jax.quantize`) is a pytree of integer values and scales, frozen as one:
:func:`is_quantized` tells one, so that a walk leaves it whole.

Example:
  >>> import flax.linen as nn, jax, jax.numpy as jnp
  >>> from c3a_jax import tree
  >>> tree.C3A_LEAVES
  ('c3a_kernel', 'c3a_kernel_out_in')
  >>> params = {"kernel": nn.Partitioned(jnp.ones((4, 8)), names=("embed", "mlp"))}
  >>> halved = jax.tree.map(lambda x: tree.rebox(x, tree.unbox(x) / 2), params, is_leaf=tree.is_box)
  >>> halved["kernel"].names, float(tree.unbox(halved["kernel"])[0, 0])
  (('embed', 'mlp'), 0.5)
  >>> tree.rebox(jnp.ones(2), jnp.zeros(2))   # a bare leaf stays bare
  Array([0., 0.], dtype=float32)
"""

from c3a_jax._layout import C3A_LEAVES, rebox
from c3a_jax._qwix import is_quantized
from c3a_jax._tree import is_box, unbox

__all__ = ["C3A_LEAVES", "is_box", "is_quantized", "rebox", "unbox"]
