"""Grouped matmul in plain XLA: row tiles of one group each, one batched matmul.

Shapes: M routed rows (grouped contiguously), I input width (contracted), O
output width, G groups, P row tiles (a static bound, `tiling.num_row_tiles`),
R buffer rows (P * tm padded rows; tm of them in one tile).

The rows take the padded layout of `moejax.kernels.tiling` (each group padded
to a tile multiple, so every tile holds one group's rows); each tile gathers
its group's [I, O] matrix and one batched matmul [P, tm, I] x [P, I, O] does
the work. Cost: R * I * O multiply-adds, R <= M + G * tm, plus P gathered
[I, O] matrices; `jax.lax.ragged_dot` costs M * I * O * G on CPU and GPU today.
jax differentiates it (gathers transpose to scatter-adds), so dlhs and drhs
cost the same again each.
"""

import jax
import jax.numpy as jnp

from moejax.kernels import tiling

# Rows per tile: padding costs up to G * tm rows, each tile one gathered [I, O]
# matrix; 128 balances the two at the sizes of the presets (M ~ 2K rows,
# I, O = 128, 512, G = 8).
DEFAULT_TM = 128
# Smallest default tile (`default_tm`): below it the per-tile weight gathers
# cost more than the padding saves.
MIN_TM = 16


def default_tm(num_rows: int, num_groups: int) -> int:
  """M/G rounded up to a power of two, within [MIN_TM, DEFAULT_TM], and at
  most M rounded up to a power of two.

  The static bound pads to M + G * tm rows, so a few rows (a small slot
  budget) take smaller tiles, whose padding costs less than their extra
  weight gathers.
  """
  per_group = 1 << max(-(-num_rows // max(num_groups, 1)) - 1, 0).bit_length()
  whole = 1 << max(num_rows - 1, 0).bit_length()
  return min(DEFAULT_TM, whole, max(MIN_TM, per_group))


def tiled_grouped_matmul(lhs_MI: jax.Array, rhs_GIO: jax.Array,
                         group_sizes_G: jax.Array, *, tm: int | None = None
                         ) -> jax.Array:
  """[M, I] rows grouped by `group_sizes_G` times [G, I, O] -> [M, O].

  Rows past sum(group_sizes) come out 0; a group whose rows would run past M
  is cut at M. `tm`: rows per tile (default `default_tm`).
  """
  num_rows, d_in = lhs_MI.shape
  tm = tm or default_tm(num_rows, rhs_GIO.shape[0])
  plan = tiling.make_tile_plan(group_sizes_G, num_rows, tm)
  x_PRI = tiling.pad_rows(lhs_MI, plan).reshape(plan.num_tiles, tm, d_in)
  # Gathered from a float32 copy: the gradient sums the tiles of a group in
  # float32 and rounds to rhs's dtype once.
  w_PIO = rhs_GIO.astype(jnp.float32)[plan.group_P].astype(rhs_GIO.dtype)
  y_PRO = jnp.einsum("pri,pio->pro", x_PRI, w_PIO,
                     preferred_element_type=jnp.float32).astype(lhs_MI.dtype)
  return tiling.unpad_rows(y_PRO.reshape(plan.num_padded_rows, -1), plan)
