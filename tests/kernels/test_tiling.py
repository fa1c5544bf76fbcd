"""The padded row layout: hand-checked tables, the waste bound, pad/unpad."""

import jax
import jax.numpy as jnp
import numpy as np

from moejax.kernels import tiled, tiling


def test_plan_by_hand():
  # M=37 rows, tm=8, sizes 9,0,17,1,6 (sum 33: rows 33..36 are unused).
  # Tiles per group: ceil(9/8)=2, 0, ceil(17/8)=3, 1, 1 -> 7 used tiles.
  # P = 37 // 8 + min(5, 37) = 4 + 5 = 9, so tiles 7 and 8 are unused (group 4).
  plan = tiling.make_tile_plan(jnp.array([9, 0, 17, 1, 6]), 37, 8)
  np.testing.assert_array_equal(plan.group_P, [0, 0, 2, 2, 2, 3, 4, 4, 4])
  np.testing.assert_array_equal(plan.tile_start_G, [0, 2, 2, 5, 6])
  np.testing.assert_array_equal(plan.tile_count_G, [2, 0, 3, 1, 1])
  np.testing.assert_array_equal(plan.num_used_tiles, [7])
  src_R = np.asarray(plan.src_row_R)
  # Group 0: rows 0..8 at padded rows 0..8, then 7 padding rows (-> 37, zero).
  np.testing.assert_array_equal(src_R[:16], list(range(9)) + [37] * 7)
  # Group 2 (rows 9..25) starts at tile 2 = padded row 16.
  np.testing.assert_array_equal(src_R[16:33], range(9, 26))
  dst_M = np.asarray(plan.dst_row_M)
  assert dst_M[9] == 16 and dst_M[26] == 40 and dst_M[27] == 48
  np.testing.assert_array_equal(dst_M[33:], [9 * 8] * 4)  # Past the groups.


def test_waste_bound_and_round_trip():
  rng = np.random.default_rng(0)
  num_rows, num_groups, tm = 50, 6, 8
  make = jax.jit(lambda s: tiling.make_tile_plan(s, num_rows, tm))
  x_MI = jnp.asarray(rng.normal(size=(num_rows, 3)), jnp.float32)
  for _ in range(20):
    total = rng.integers(0, num_rows + 1)
    cuts = np.sort(rng.integers(0, total + 1, num_groups - 1))
    sizes_G = np.diff(np.concatenate([[0], cuts, [total]]))
    plan = make(jnp.asarray(sizes_G, jnp.int32))
    used = int(plan.num_used_tiles[0])
    assert used <= plan.num_tiles
    # Rows added inside groups: at most tm - 1 per group.
    assert used * tm - total <= num_groups * (tm - 1)
    x_RI = tiling.pad_rows(x_MI, plan)
    real = np.asarray(plan.src_row_R) < num_rows
    assert real.sum() == total
    np.testing.assert_array_equal(np.asarray(x_RI)[~real], 0)
    back_MI = np.asarray(tiling.unpad_rows(x_RI, plan))
    np.testing.assert_array_equal(back_MI[:total], np.asarray(x_MI)[:total])
    np.testing.assert_array_equal(back_MI[total:], 0)
    # Every tile holds rows of its table group only.
    group_of_row = np.repeat(np.arange(num_groups), sizes_G)
    src = np.asarray(plan.src_row_R).reshape(-1, tm)
    for t, g in enumerate(np.asarray(plan.group_P)):
      rows = src[t][src[t] < num_rows]
      assert np.all(group_of_row[rows] == g)


def test_fit_tile():
  assert tiling.fit_tile(4096, 128) == 128
  assert tiling.fit_tile(12, 128) == 16  # Next power of two, at least 16.
  assert tiling.fit_tile(40, 128) == 64
  assert tiling.fit_tile(40, 8) == 8  # A small requested tile is kept.


def test_default_tm_follows_rows_per_group():
  # M/G rounded up to a power of two, within [16, 128], at most M's power.
  assert tiled.default_tm(2048, 8) == 128
  assert tiled.default_tm(512, 8) == 64
  assert tiled.default_tm(64, 8) == 16
  assert tiled.default_tm(5, 8) == 8
  for rows in range(1, 3000, 37):
    tm = tiled.default_tm(rows, 8)
    assert tm & (tm - 1) == 0 and tm <= 128
    assert tm >= min(16, rows) and tm < 2 * max(rows, 1)
