"""A naive per-row loop: the reference every grouped matmul impl is checked against.

Shapes (kernels/ only: K is a contraction width): M rows, K, N, G groups.
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


def grouped_matmul_loop(lhs_MK, rhs_GKN, group_sizes_G) -> np.ndarray:
  """float64 out[m] = lhs[m] @ rhs[group(m)], zero for rows past the groups."""
  lhs_MK = np.asarray(lhs_MK, np.float64)
  rhs_GKN = np.asarray(rhs_GKN, np.float64)
  group_M = row_groups(group_sizes_G, lhs_MK.shape[0])
  out_MN = np.zeros((lhs_MK.shape[0], rhs_GKN.shape[2]))
  for m, g in enumerate(group_M):
    if g >= 0:
      out_MN[m] = lhs_MK[m] @ rhs_GKN[g]
  return out_MN


def grouped_matmul_grads_loop(lhs_MK, rhs_GKN, group_sizes_G, dout_MN
                              ) -> tuple[np.ndarray, np.ndarray]:
  """float64 (dlhs, drhs) of sum(out * dout), row by row.

  dlhs[m] = dout[m] @ rhs[g]^T and drhs[g] = sum over g's rows of
  outer(lhs[m], dout[m]); rows past the groups get 0 and add nothing.
  """
  lhs_MK = np.asarray(lhs_MK, np.float64)
  rhs_GKN = np.asarray(rhs_GKN, np.float64)
  dout_MN = np.asarray(dout_MN, np.float64)
  group_M = row_groups(group_sizes_G, lhs_MK.shape[0])
  dlhs_MK = np.zeros_like(lhs_MK)
  drhs_GKN = np.zeros_like(rhs_GKN)
  for m, g in enumerate(group_M):
    if g >= 0:
      dlhs_MK[m] = dout_MN[m] @ rhs_GKN[g].T
      drhs_GKN[g] += np.outer(lhs_MK[m], dout_MN[m])
  return dlhs_MK, drhs_GKN
