"""The one independent reference the tests compare against: C3A's definition, in float64 numpy.

delta[i*b + r, j*b + c] = w[i, j, (c - r) mod b] / d_in        (PyTorch (out, in) layout)
"""

import numpy as np


def dense_reference(w: np.ndarray) -> np.ndarray:
  """The definition above written out with loops: the (out, in) delta, float64."""
  w = np.asarray(w, np.float64)
  m, n, b = w.shape
  delta = np.zeros((m * b, n * b), np.float64)
  for i in range(m):
    for j in range(n):
      for r in range(b):
        for c in range(b):
          delta[i * b + r, j * b + c] = w[i, j, (c - r) % b] / (n * b)
  return delta


def kernel_grad_reference(x: np.ndarray, w: np.ndarray, g: np.ndarray) -> np.ndarray:
  """dL/dw for L = <x @ delta.T, g>, by the chain rule through each entry of the delta."""
  m, n, b = np.shape(w)
  g_delta = np.reshape(g, (-1, m * b)).T.astype(np.float64) @ np.reshape(x, (-1, n * b)).astype(
    np.float64
  )  # dL/d delta[row, col]
  ref = np.zeros((m, n, b))
  for r in range(b):
    for c in range(b):
      ref[:, :, (c - r) % b] += g_delta.reshape(m, b, n, b)[:, r, :, c] / (n * b)
  return ref
