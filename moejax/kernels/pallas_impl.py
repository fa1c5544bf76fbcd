"""impl="pallas": pad groups to tile multiples, Pallas kernels, unpad; custom VJP.

Shapes: M routed rows, I input width (contracted), O output width, G groups,
R buffer rows (padded, see `tiling`).

Forward:  y = unpad(gmm(pad(x), w))                   [M, I] x [G, I, O] -> [M, O]
Backward: dy_R = pad(dy)
          dx = unpad(gmm(dy_R, w, transpose_rhs))     w read as [G, O, I]
          dw = tgmm(pad(x), dy_R)                     dw[g] = x_g^T @ dy_g
dw is its own kernel (`tgmm`, the ragged-contracting product): each group's
tiles are contiguous in the padded layout, so a group sums its tiles' x^T @ dy
(padding rows are zero and add nothing). The padded x is the residual.

`target` picks the kernel family: "gpu" (Triton-style, `pallas_gpu`) or "tpu"
(Mosaic-style, `pallas_tpu`); both run anywhere with interpret=True.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from moejax.kernels import pallas_gpu, pallas_tpu, tiling

KERNELS = {"gpu": pallas_gpu, "tpu": pallas_tpu}


@dataclasses.dataclass(frozen=True)
class PallasConfig:
  """Static settings of one pallas grouped matmul.

  Attributes:
    target: "gpu" or "tpu", the kernel family.
    tiles: (tm, tk, tn) effective tiles (already fitted to the shapes).
    interpret: run the kernels in the Pallas interpreter (CPU).
  """

  target: str
  tiles: tuple[int, int, int]
  interpret: bool


def fitted_tiles(target: str, shape_MIO: tuple[int, int, int],
                 requested: tuple[int, int, int] | None
                 ) -> tuple[int, int, int]:
  """(tm, tk, tn): the target's defaults (or `requested`), shrunk for small dims.

  A dimension smaller than its tile gets the next power of two >= it (at least
  16, Triton's smallest dot), so tiny shapes do not pad to 128.
  """
  wanted = requested or KERNELS[target].TILES
  return tuple(tiling.fit_tile(d, t) for d, t in zip(shape_MIO, wanted))


def _forward(lhs_MI, rhs_GIO, group_sizes_G, cfg: PallasConfig):
  kernels = KERNELS[cfg.target]
  tm, tk, tn = cfg.tiles
  num_rows, num_cols = lhs_MI.shape[0], rhs_GIO.shape[2]
  plan = tiling.make_tile_plan(group_sizes_G, num_rows, tm)
  x_RI = tiling.pad_rows(tiling.pad_to_multiple(lhs_MI, 1, tk), plan)
  w_GIO = tiling.pad_to_multiple(tiling.pad_to_multiple(rhs_GIO, 1, tk), 2, tn)
  y_RO = kernels.gmm(x_RI, w_GIO, plan, tiles=cfg.tiles,
                     interpret=cfg.interpret)
  return tiling.unpad_rows(y_RO, plan)[:, :num_cols], (x_RI, plan)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs_MI, rhs_GIO, group_sizes_G, cfg: PallasConfig):
  return _forward(lhs_MI, rhs_GIO, group_sizes_G, cfg)[0]


def _gmm_fwd(lhs_MI, rhs_GIO, group_sizes_G, cfg: PallasConfig):
  out_MO, (x_RI, plan) = _forward(lhs_MI, rhs_GIO, group_sizes_G, cfg)
  return out_MO, (x_RI, rhs_GIO, plan)


def _gmm_bwd(cfg: PallasConfig, residuals, dout_MO):
  x_RI, rhs_GIO, plan = residuals
  kernels = KERNELS[cfg.target]
  tm, tk, tn = cfg.tiles
  num_groups, d_in, num_cols = rhs_GIO.shape
  dy_RO = tiling.pad_rows(
      tiling.pad_to_multiple(dout_MO.astype(x_RI.dtype), 1, tn), plan)
  w_GIO = tiling.pad_to_multiple(tiling.pad_to_multiple(rhs_GIO, 1, tk), 2, tn)
  # dX: contraction over O (tiles of tn), output over I (tiles of tk).
  dx_RI = kernels.gmm(dy_RO, w_GIO, plan, tiles=(tm, tn, tk),
                      transpose_rhs=True, interpret=cfg.interpret)
  dlhs_MI = tiling.unpad_rows(dx_RI, plan)[:, :d_in]
  drhs_GIO = kernels.tgmm(x_RI, dy_RO, plan, num_groups, tiles=cfg.tiles,
                          out_dtype=rhs_GIO.dtype, interpret=cfg.interpret)
  return dlhs_MI, drhs_GIO[:, :d_in, :num_cols], None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def pallas_grouped_matmul(lhs_MI: jax.Array, rhs_GIO: jax.Array,
                          group_sizes_G: jax.Array, *, target: str,
                          tiles: tuple[int, int, int] | None = None,
                          interpret: bool = False) -> jax.Array:
  """[M, I] rows grouped by `group_sizes_G` times [G, I, O] -> [M, O].

  lhs and rhs share a dtype; rows past sum(group_sizes) come out 0. `tiles`
  is (tm, tk, tn) before fitting to small shapes (None: the target's default).
  """
  if target not in KERNELS:
    raise ValueError(f"pallas target {target!r}; valid: {', '.join(KERNELS)}")
  num_rows, d_in = lhs_MI.shape
  cfg = PallasConfig(
      target=target,
      tiles=fitted_tiles(target, (num_rows, d_in, rhs_GIO.shape[2]), tiles),
      interpret=interpret)
  return _gmm(lhs_MI, rhs_GIO, group_sizes_G.astype(jnp.int32), cfg)
