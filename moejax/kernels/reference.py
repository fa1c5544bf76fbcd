"""A naive per-row loop: the reference every grouped matmul impl is checked against.

Shapes: M routed rows, I input width, O output width, G groups.
"""

import numpy as np


def row_groups(group_sizes_G, num_rows: int) -> np.ndarray:
  """int[M] group of each row; -1 for rows past sum(group_sizes)."""
  group_M = np.full(num_rows, -1)
  row = 0
  for g, size in enumerate(np.asarray(group_sizes_G)):
    for _ in range(int(size)):
      if row < num_rows:
        group_M[row] = g
      row += 1
  return group_M


def grouped_matmul_loop(lhs_MI, rhs_GIO, group_sizes_G) -> np.ndarray:
  """float64 out[m] = lhs[m] @ rhs[group(m)], zero for rows past the groups."""
  lhs_MI = np.asarray(lhs_MI, np.float64)
  rhs_GIO = np.asarray(rhs_GIO, np.float64)
  group_M = row_groups(group_sizes_G, lhs_MI.shape[0])
  out_MO = np.zeros((lhs_MI.shape[0], rhs_GIO.shape[2]))
  for m, g in enumerate(group_M):
    if g >= 0:
      out_MO[m] = lhs_MI[m] @ rhs_GIO[g]
  return out_MO


def grouped_matmul_grads_loop(lhs_MI, rhs_GIO, group_sizes_G, dout_MO
                              ) -> tuple[np.ndarray, np.ndarray]:
  """float64 (dlhs, drhs) of sum(out * dout), row by row.

  dlhs[m] = dout[m] @ rhs[g]^T and drhs[g] = sum over g's rows of
  outer(lhs[m], dout[m]); rows past the groups get 0 and add nothing.
  """
  lhs_MI = np.asarray(lhs_MI, np.float64)
  rhs_GIO = np.asarray(rhs_GIO, np.float64)
  dout_MO = np.asarray(dout_MO, np.float64)
  group_M = row_groups(group_sizes_G, lhs_MI.shape[0])
  dlhs_MI = np.zeros_like(lhs_MI)
  drhs_GIO = np.zeros_like(rhs_GIO)
  for m, g in enumerate(group_M):
    if g >= 0:
      dlhs_MI[m] = dout_MO[m] @ rhs_GIO[g].T
      drhs_GIO[g] += np.outer(lhs_MI[m], dout_MO[m])
  return dlhs_MI, drhs_GIO
