"""Grouped matmul kernels for the Pallas Mosaic (TPU) backend, on padded rows.

Shapes: R buffer rows (P * tm padded rows), P row tiles of tm rows, I input
width (contracted), O output width, G groups.

Written for Mosaic's model: BlockSpecs move (tm, tk) / (tk, tn) tiles into
VMEM, the block->group table arrives by scalar prefetch and picks the weight
block inside the index map, and the I reduction is the innermost
("arbitrary") grid axis accumulating in a float32 VMEM scratch. Runs on CPU
with `interpret=True`. On TPU, `impl="megablox"` (jax's tuned kernel) is the
default; this one is the same design as `pallas_gpu`, kept for comparison.

- `gmm`: grid (O/tn, P, I/tk); unused trailing tiles skip the matmul and
  re-use the last used tile's input blocks (no new DMA), writing zeros.
- `tgmm`: grid (I/tk, O/tn, P); a group's tiles are consecutive, so its output
  block is revisited on consecutive steps: zeroed at its first tile, stored at
  its last. Empty groups own no tile and are zeroed afterwards.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moejax.kernels.tiling import TilePlan, gmm_dims

TILES = (128, 128, 128)  # (tm, tk, tn); MXU-sized, not yet tuned on hardware.


def _dot(a, b, contract_a: int, contract_b: int):
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _gmm_kernel(group_ref, used_ref, x_ref, w_ref, o_ref, acc_ref, *,
                transpose_rhs):
  t, k = pl.program_id(1), pl.program_id(2)
  used = t < used_ref[0]

  @pl.when(k == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(used)
  def _accumulate():
    contract_b = 1 if transpose_rhs else 0
    acc_ref[...] += _dot(x_ref[...], w_ref[...], 1, contract_b)

  @pl.when(k == pl.num_programs(2) - 1)
  def _store():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def gmm(x_RI: jax.Array, w_GIO: jax.Array, plan: TilePlan, *,
        tiles: tuple[int, int, int], transpose_rhs: bool = False,
        interpret: bool = False) -> jax.Array:
  """[R, I] padded rows times their tile's group weights -> [R, O].

  With transpose_rhs, w is [G, O, I] and read transposed (the dX product).
  I and O must be multiples of tk and tn; R is P * tm by construction.
  """
  tm, tk, tn = tiles
  num_rows, d_in, d_out = gmm_dims(x_RI, w_GIO, plan, tiles, transpose_rhs)

  def live(t, used_ref):  # An unused tile re-reads the last used tile's blocks.
    return jnp.maximum(jnp.minimum(t, used_ref[0] - 1), 0)

  def x_map(j, t, k, group_ref, used_ref):
    return live(t, used_ref), k

  def w_map(j, t, k, group_ref, used_ref):
    g = group_ref[live(t, used_ref)]
    return (g, j, k) if transpose_rhs else (g, k, j)

  w_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(d_out // tn, plan.num_tiles, d_in // tk),
      in_specs=[pl.BlockSpec((tm, tk), x_map), pl.BlockSpec(w_block, w_map)],
      out_specs=pl.BlockSpec((tm, tn), lambda j, t, k, *_: (t, j)),
      scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)])
  return pl.pallas_call(
      functools.partial(_gmm_kernel, transpose_rhs=transpose_rhs),
      out_shape=jax.ShapeDtypeStruct((num_rows, d_out), x_RI.dtype),
      grid_spec=grid_spec,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      name="moejax_gmm_tpu",
  )(plan.group_P, plan.num_used_tiles, x_RI, w_GIO)


def _tgmm_kernel(group_ref, x_ref, dy_ref, o_ref, acc_ref):
  t, last = pl.program_id(2), pl.num_programs(2) - 1
  g = group_ref[t]
  first_of_group = (t == 0) | (group_ref[jnp.maximum(t - 1, 0)] != g)
  last_of_group = (t == last) | (group_ref[jnp.minimum(t + 1, last)] != g)

  @pl.when(first_of_group)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] += _dot(x_ref[...], dy_ref[...], 0, 0)

  @pl.when(last_of_group)
  def _store():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def tgmm(x_RI: jax.Array, dy_RO: jax.Array, plan: TilePlan, num_groups: int, *,
         tiles: tuple[int, int, int], out_dtype: jnp.dtype,
         interpret: bool = False) -> jax.Array:
  """Per group g: x[g's rows]^T @ dy[g's rows] -> [G, I, O] (0 for empty g).

  Unused trailing tiles extend the last group with zero rows (adding 0).
  """
  tm, tk, tn = tiles
  num_rows, d_in = x_RI.shape
  d_out = dy_RO.shape[1]
  assert tm == plan.tm and num_rows == plan.num_padded_rows
  assert d_in % tk == 0 and d_out % tn == 0, (d_in, tk, d_out, tn)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(d_in // tk, d_out // tn, plan.num_tiles),
      in_specs=[pl.BlockSpec((tm, tk), lambda kb, j, t, grp: (t, kb)),
                pl.BlockSpec((tm, tn), lambda kb, j, t, grp: (t, j))],
      out_specs=pl.BlockSpec((None, tk, tn),
                             lambda kb, j, t, grp: (grp[t], kb, j)),
      scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)])
  dw_GIO = pl.pallas_call(
      _tgmm_kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, d_in, d_out), out_dtype),
      grid_spec=grid_spec,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="moejax_tgmm_tpu",
  )(plan.group_P, x_RI, dy_RO)
  # An empty group is never visited, or only by unused tiles (which add 0).
  nonempty_G = plan.tile_count_G > 0
  return jnp.where(nonempty_G[:, None, None], dw_GIO, jnp.zeros_like(dw_GIO))
