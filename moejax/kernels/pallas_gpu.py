"""Grouped matmul kernels for the Pallas Triton (GPU) backend, on padded rows.

Shapes: R buffer rows (P * tm padded rows), P row tiles of tm rows, I input
width (contracted), O output width, G groups.

Written for Triton's model: refs are whole arrays in global memory (no
BlockSpecs), every program loads power-of-two tiles with `pl.ds`, and the
block->group table is an ordinary int32 input read as a scalar. The same code
runs on CPU with `interpret=True`, which is how the tests exercise it.

- `gmm`: out[tile t] = x[tile t] @ w[group_P[t]], grid (P, O/tn), an I loop
  inside; unused trailing tiles write zeros without loading anything.
- `tgmm`: dw[g] = sum over g's tiles of x[tile]^T @ dy[tile], grid
  (G, I/tk, O/tn), a loop over the group's tiles with dynamic bounds (an empty
  group's loop runs 0 times and writes zeros): the ragged-contracting product.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from moejax.kernels.tiling import TilePlan, gmm_dims

# (tm, tk, tn), a common Triton bf16 matmul shape, not yet tuned on hardware:
# a 128x128 float32 accumulator over 4 warps, and (128x64 + 64x128) bf16 = 32 KiB
# of shared memory per pipeline stage (3 stages < 228 KiB on H100). tm also sets
# the padding: about G * tm / 2 extra rows expected (E=64, T*k=32768: ~12% at
# tm=128, ~6% at tm=64), the first thing to weigh when tuning.
TILES = (128, 64, 128)
# Passing Triton's params is what selects the Triton backend (jax's default
# for pallas_call on GPU may be Mosaic GPU, whose model this kernel does not fit).
COMPILER_PARAMS = pltriton.CompilerParams(num_warps=4, num_stages=3)


def _tile(index, size: int) -> pl.Slice:
  """The index-th block of `size` (the start hint lets Triton vectorise loads)."""
  return pl.ds(pl.multiple_of(index * size, size), size)


def _dot(a, b, contract_a: int, contract_b: int):
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _gmm_kernel(group_ref, used_ref, x_ref, w_ref, o_ref, *, tm, tk, tn,
                num_k, transpose_rhs):
  t, j = pl.program_id(0), pl.program_id(1)
  rows, cols = _tile(t, tm), _tile(j, tn)
  used = t < used_ref[0]

  @pl.when(used)
  def _compute():
    g = group_ref[t]

    def body(k, acc_RO):
      ks = _tile(k, tk)
      x_RI = x_ref[rows, ks]
      if transpose_rhs:
        return acc_RO + _dot(x_RI, w_ref[g, cols, ks], 1, 1)
      return acc_RO + _dot(x_RI, w_ref[g, ks, cols], 1, 0)

    acc_RO = jax.lax.fori_loop(0, num_k, body, jnp.zeros((tm, tn), jnp.float32))
    o_ref[rows, cols] = acc_RO.astype(o_ref.dtype)

  @pl.when(jnp.logical_not(used))
  def _zero():
    o_ref[rows, cols] = jnp.zeros((tm, tn), o_ref.dtype)


def gmm(x_RI: jax.Array, w_GIO: jax.Array, plan: TilePlan, *,
        tiles: tuple[int, int, int], transpose_rhs: bool = False,
        interpret: bool = False) -> jax.Array:
  """[R, I] padded rows times their tile's group weights -> [R, O].

  With transpose_rhs, w is [G, O, I] and read transposed (the dX product).
  I and O must be multiples of tk and tn; R is P * tm by construction.
  """
  tm, tk, tn = tiles
  num_rows, d_in, d_out = gmm_dims(x_RI, w_GIO, plan, tiles, transpose_rhs)
  kernel = functools.partial(_gmm_kernel, tm=tm, tk=tk, tn=tn,
                             num_k=d_in // tk, transpose_rhs=transpose_rhs)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_rows, d_out), x_RI.dtype),
      grid=(plan.num_tiles, d_out // tn),
      compiler_params=COMPILER_PARAMS,
      interpret=interpret,
      name="moejax_gmm",
  )(plan.group_P, plan.num_used_tiles, x_RI, w_GIO)


def _tgmm_kernel(start_ref, count_ref, x_ref, dy_ref, o_ref, *, tm, tk, tn):
  g, kb, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  ks, cols = _tile(kb, tk), _tile(j, tn)
  start = start_ref[g]

  def body(t, acc_IO):
    rows = _tile(t, tm)
    return acc_IO + _dot(x_ref[rows, ks], dy_ref[rows, cols], 0, 0)

  acc_IO = jax.lax.fori_loop(start, start + count_ref[g], body,
                             jnp.zeros((tk, tn), jnp.float32))
  o_ref[g, ks, cols] = acc_IO.astype(o_ref.dtype)


def tgmm(x_RI: jax.Array, dy_RO: jax.Array, plan: TilePlan, num_groups: int, *,
         tiles: tuple[int, int, int], out_dtype: jnp.dtype,
         interpret: bool = False) -> jax.Array:
  """Per group g: x[g's rows]^T @ dy[g's rows] -> [G, I, O] (0 for empty g)."""
  tm, tk, tn = tiles
  num_rows, d_in = x_RI.shape
  d_out = dy_RO.shape[1]
  assert tm == plan.tm and num_rows == plan.num_padded_rows
  assert d_in % tk == 0 and d_out % tn == 0, (d_in, tk, d_out, tn)
  kernel = functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, d_in, d_out), out_dtype),
      grid=(num_groups, d_in // tk, d_out // tn),
      compiler_params=COMPILER_PARAMS,
      interpret=interpret,
      name="moejax_tgmm",
  )(plan.tile_start_G, plan.tile_count_G, x_RI, dy_RO)
