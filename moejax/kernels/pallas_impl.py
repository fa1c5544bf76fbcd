"""impl="pallas": pad groups to tile multiples, Pallas kernels, unpad; custom VJP.

Shapes (kernels/ only: K is a contraction width): M rows, K contraction, N
output width, G groups, R padded rows (see `tiling`).

Forward:  y = unpad(gmm(pad(x), w))                   [M, K] x [G, K, N] -> [M, N]
Backward: dy_R = pad(dy)
          dx = unpad(gmm(dy_R, w, transpose_rhs))     w read as [G, N, K]
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


def fitted_tiles(target: str, shape_MKN: tuple[int, int, int],
                 requested: tuple[int, int, int] | None
                 ) -> tuple[int, int, int]:
  """(tm, tk, tn): the target's defaults (or `requested`), shrunk for small dims.

  A dimension smaller than its tile gets the next power of two >= it (at least
  16, Triton's smallest dot), so tiny shapes do not pad to 128.
  """
  wanted = requested or KERNELS[target].TILES
  return tuple(tiling.fit_tile(d, t) for d, t in zip(shape_MKN, wanted))


def _forward(lhs_MK, rhs_GKN, group_sizes_G, cfg: PallasConfig):
  kernels = KERNELS[cfg.target]
  tm, tk, tn = cfg.tiles
  num_rows, num_cols = lhs_MK.shape[0], rhs_GKN.shape[2]
  plan = tiling.make_tile_plan(group_sizes_G, num_rows, tm)
  x_RK = tiling.pad_rows(tiling.pad_to_multiple(lhs_MK, 1, tk), plan)
  w_GKN = tiling.pad_to_multiple(tiling.pad_to_multiple(rhs_GKN, 1, tk), 2, tn)
  y_RN = kernels.gmm(x_RK, w_GKN, plan, tiles=cfg.tiles,
                     interpret=cfg.interpret)
  return tiling.unpad_rows(y_RN, plan)[:, :num_cols], (x_RK, plan)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs_MK, rhs_GKN, group_sizes_G, cfg: PallasConfig):
  return _forward(lhs_MK, rhs_GKN, group_sizes_G, cfg)[0]


def _gmm_fwd(lhs_MK, rhs_GKN, group_sizes_G, cfg: PallasConfig):
  out_MN, (x_RK, plan) = _forward(lhs_MK, rhs_GKN, group_sizes_G, cfg)
  return out_MN, (x_RK, rhs_GKN, plan)


def _gmm_bwd(cfg: PallasConfig, residuals, dout_MN):
  x_RK, rhs_GKN, plan = residuals
  kernels = KERNELS[cfg.target]
  tm, tk, tn = cfg.tiles
  num_groups, num_k, num_cols = rhs_GKN.shape
  dy_RN = tiling.pad_rows(
      tiling.pad_to_multiple(dout_MN.astype(x_RK.dtype), 1, tn), plan)
  w_GKN = tiling.pad_to_multiple(tiling.pad_to_multiple(rhs_GKN, 1, tk), 2, tn)
  # dX: contraction over N (tiles of tn), output over K (tiles of tk).
  dx_RK = kernels.gmm(dy_RN, w_GKN, plan, tiles=(tm, tn, tk),
                      transpose_rhs=True, interpret=cfg.interpret)
  dlhs_MK = tiling.unpad_rows(dx_RK, plan)[:, :num_k]
  drhs_GKN = kernels.tgmm(x_RK, dy_RN, plan, num_groups, tiles=cfg.tiles,
                          out_dtype=rhs_GKN.dtype, interpret=cfg.interpret)
  return dlhs_MK, drhs_GKN[:, :num_k, :num_cols], None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def pallas_grouped_matmul(lhs_MK: jax.Array, rhs_GKN: jax.Array,
                          group_sizes_G: jax.Array, *, target: str,
                          tiles: tuple[int, int, int] | None = None,
                          interpret: bool = False) -> jax.Array:
  """[M, K] rows grouped by `group_sizes_G` times [G, K, N] -> [M, N].

  lhs and rhs share a dtype; rows past sum(group_sizes) come out 0. `tiles`
  is (tm, tk, tn) before fitting to small shapes (None: the target's default).
  """
  if target not in KERNELS:
    raise ValueError(f"pallas target {target!r}; valid: {', '.join(KERNELS)}")
  num_rows, num_k = lhs_MK.shape
  cfg = PallasConfig(
      target=target,
      tiles=fitted_tiles(target, (num_rows, num_k, rhs_GKN.shape[2]), tiles),
      interpret=interpret)
  return _gmm(lhs_MK, rhs_GKN, group_sizes_G.astype(jnp.int32), cfg)
