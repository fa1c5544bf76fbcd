"""Row tiling for grouped matmuls: each group padded only to a tile multiple.

Shapes: M routed rows (grouped contiguously by group), G groups, P row tiles
(M // tm + min(G, M), a static bound, of tm rows), R buffer rows (P * tm
padded rows), I input width, O output width.

The padded layout puts group g at tile `tile_start_G[g]` and gives it
`ceil(size_g / tm)` tiles, so every tile holds rows of one group only and a
kernel looks its group up in `group_P`, the block->group table. Padding rows
are zero. Waste:
  - rows inserted inside groups: sum_g (ceil(s_g/tm)*tm - s_g) <= G * (tm - 1);
  - the static bound adds up to min(G, M) trailing tiles beyond the used ones;
    kernels skip their compute (`num_used_tiles`) and write zeros.
So a kernel computes at most M + G*(tm-1) rows (about M + G*tm/2 expected for
random sizes), against ragged_dot's dense M * G on GPU/CPU today.
"""

import flax
import jax
import jax.numpy as jnp


def num_row_tiles(num_rows: int, num_groups: int, tm: int) -> int:
  """P, a static bound on sum_g ceil(s_g / tm) given sum_g s_g <= M.

  ceil(s/tm) <= floor(s/tm) + 1 for s > 0, and sum floor(s_g/tm) <=
  floor(M/tm); at most min(G, M) groups are nonempty.
  """
  return num_rows // tm + min(num_groups, num_rows)


@flax.struct.dataclass
class TilePlan:
  """Where each row lives in the padded layout and which group owns each tile.

  Attributes:
    group_P: int32[P] group of each row tile; unused trailing tiles carry G-1
      (their rows are zero), so groups stay in ascending tile order.
    tile_start_G: int32[G] first tile of each group.
    tile_count_G: int32[G] tiles of each group (0 for an empty group).
    num_used_tiles: int32[1] sum of tile_count_G; tiles from here on are unused.
    src_row_R: int32[R] source row of each padded row; M (a zero row) for
      padding.
    dst_row_M: int32[M] padded row of each row; R (a zero row) for rows past
      sum(group_sizes).
  """

  group_P: jax.Array
  tile_start_G: jax.Array
  tile_count_G: jax.Array
  num_used_tiles: jax.Array
  src_row_R: jax.Array
  dst_row_M: jax.Array
  tm: int = flax.struct.field(pytree_node=False)

  @property
  def num_tiles(self) -> int:
    return self.group_P.shape[0]

  @property
  def num_padded_rows(self) -> int:
    return self.src_row_R.shape[0]


def make_tile_plan(group_sizes_G: jax.Array, num_rows: int, tm: int) -> TilePlan:
  """The padded layout of M rows grouped by `group_sizes_G`, tiles of tm rows.

  Groups whose rows would run past M are cut at M (as if sum(sizes) <= M).
  """
  num_groups = group_sizes_G.shape[0]
  num_tiles = num_row_tiles(num_rows, num_groups, tm)
  sizes_G = group_sizes_G.astype(jnp.int32)
  ends_G = jnp.minimum(jnp.cumsum(sizes_G), num_rows)
  starts_G = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_G[:-1]])
  sizes_G = ends_G - starts_G
  tile_count_G = (sizes_G + tm - 1) // tm
  tile_end_G = jnp.cumsum(tile_count_G)
  tile_start_G = tile_end_G - tile_count_G
  num_used = tile_end_G[-1]

  # Tile t belongs to the first group whose tiles end after t.
  tile_P = jnp.arange(num_tiles, dtype=jnp.int32)
  group_P = jnp.minimum(
      jnp.searchsorted(tile_end_G, tile_P, side="right"), num_groups - 1)

  row_R = jnp.arange(num_tiles * tm, dtype=jnp.int32)
  g_R = group_P[row_R // tm]
  offset_R = row_R - tile_start_G[g_R] * tm
  real_R = (row_R // tm < num_used) & (offset_R < sizes_G[g_R])
  src_row_R = jnp.where(real_R, starts_G[g_R] + offset_R, num_rows)

  row_M = jnp.arange(num_rows, dtype=jnp.int32)
  g_M = jnp.minimum(jnp.searchsorted(ends_G, row_M, side="right"),
                    num_groups - 1)
  dst_row_M = jnp.where(row_M < ends_G[-1],
                        tile_start_G[g_M] * tm + row_M - starts_G[g_M],
                        num_tiles * tm)
  return TilePlan(
      group_P=group_P.astype(jnp.int32), tile_start_G=tile_start_G.astype(jnp.int32),
      tile_count_G=tile_count_G.astype(jnp.int32),
      num_used_tiles=num_used.astype(jnp.int32)[None],
      src_row_R=src_row_R.astype(jnp.int32), dst_row_M=dst_row_M.astype(jnp.int32),
      tm=tm)


def _gather_rows_with_zero(x: jax.Array, rows: jax.Array) -> jax.Array:
  """x[rows], where row index x.shape[0] reads a zero row (no copy of x)."""
  return x.at[rows].get(mode="fill", fill_value=0)


def pad_rows(x: jax.Array, plan: TilePlan) -> jax.Array:
  """[M, ...] grouped rows -> [R, ...] padded layout (padding rows zero)."""
  return _gather_rows_with_zero(x, plan.src_row_R)


def unpad_rows(x: jax.Array, plan: TilePlan) -> jax.Array:
  """[R, ...] padded layout -> [M, ...] grouped rows (zero past the groups).

  pad_rows and unpad_rows are each other's transpose: every real row appears
  exactly once on each side, so the VJP of one is the other.
  """
  return _gather_rows_with_zero(x, plan.dst_row_M)


def pad_to_multiple(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  """Zero-pads `axis` up to a multiple (no copy when already aligned)."""
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def fit_tile(dim: int, tile: int) -> int:
  """`tile`, or for a smaller dim the next power of two >= dim, at least 16.

  Triton needs power-of-two blocks and dots of at least 16 per side; an
  explicitly requested tile below 16 (tests) is kept as is.
  """
  return min(tile, max(16, 1 << (max(dim, 1) - 1).bit_length()))


def gmm_dims(x_RI, w_GIO, plan: TilePlan, tiles: tuple[int, int, int],
             transpose_rhs: bool) -> tuple[int, int, int]:
  """(R, I, O) of a padded grouped matmul, checked against the plan and tiles.

  With transpose_rhs, w is [G, O, I] (the dX product).
  """
  tm, tk, tn = tiles
  num_rows, d_in = x_RI.shape
  d_out = w_GIO.shape[1] if transpose_rhs else w_GIO.shape[2]
  assert tm == plan.tm and num_rows == plan.num_padded_rows
  assert d_in % tk == 0 and d_out % tn == 0, (d_in, tk, d_out, tn)
  return num_rows, d_in, d_out
