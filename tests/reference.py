"""Independent references the tests compare against."""

import numpy as np


def dense_reference(w: np.ndarray) -> np.ndarray:
  """DESIGN.md section 1 written out with loops: delta[i*b+r, j*b+c] = w[i,j,(c-r)%b] / d_in."""
  m, n, b = w.shape
  delta = np.zeros((m * b, n * b), np.float64)
  for i in range(m):
    for j in range(n):
      for r in range(b):
        for c in range(b):
          delta[i * b + r, j * b + c] = w[i, j, (c - r) % b] / (n * b)
  return delta  # PyTorch (out, in) layout
