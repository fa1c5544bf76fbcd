"""Grouped matmul: rows grouped contiguously, each group times its own matrix.

Shapes: M routed rows (the lhs rows, grouped contiguously), I input width
(contracted), O output width, G groups.

  out[m] = lhs[m] @ rhs[g(m)]  for m < sum(group_sizes);  0 for later rows.

Implementations, by name (`MATMUL_IMPLS`):
  xla       jax.lax.ragged_dot. On CPU and GPU it computes a dense product, so its
            cost grows with G; differentiated by jax's own rules.
  pallas    pad each group to a tile multiple (waste <= G * tm rows), look each
            tile's group up in a block->group table, Pallas kernels: Triton on
            GPU, Mosaic on TPU, the interpreter on CPU. Custom VJP: dX is the
            same kernel with rhs read transposed, dW a ragged-contracting
            kernel (see `pallas_impl`).
  megablox  jax's TPU kernel `megablox.gmm` (interpreted on CPU).
  tiled     plain XLA: the pallas layout (tiles of one group) and one batched
            matmul over gathered weight tiles; cost (M + G * tm) rows, not
            M * G (see `tiled`). The fast impl on CPU.
  auto      pallas on GPU, megablox on TPU, tiled elsewhere.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax.kernels import megablox, pallas_impl, tiled

Tiles = tuple[int, int, int]
GroupedMatmul = Callable[..., jax.Array]

MATMUL_IMPLS: tuple[str, ...] = ("auto", "xla", "pallas", "megablox", "tiled")
_AUTO = {"gpu": "pallas", "tpu": "megablox"}


def check_impl(name: str) -> str:
  """Returns `name` if it is a known impl; a ConfigError listing them otherwise."""
  if name not in MATMUL_IMPLS:
    raise ConfigError(
        f"unknown grouped matmul impl {name!r}; valid: {', '.join(MATMUL_IMPLS)}")
  return name


def resolve_impl(name: str, platform: str | None = None) -> str:
  """The concrete impl `name` runs as on `platform` (default: jax's backend)."""
  check_impl(name)
  if name != "auto":
    return name
  return _AUTO.get(platform or jax.default_backend(), "tiled")


def available_impls(platform: str | None = None) -> tuple[str, ...]:
  """Concrete impls worth running on `platform`: xla, tiled, pallas
  (interpreted on CPU), and megablox on TPU where importable (tests interpret
  it on CPU)."""
  platform = platform or jax.default_backend()
  names = ["xla", "tiled", "pallas"]
  if platform == "tpu" and megablox.is_available():
    names.append("megablox")
  return tuple(names)


def _xla(lhs_MI, rhs_GIO, group_sizes_G, *, tiles, interpret):
  del tiles, interpret
  return jax.lax.ragged_dot(lhs_MI, rhs_GIO, group_sizes_G)


def _pallas(lhs_MI, rhs_GIO, group_sizes_G, *, tiles, interpret):
  platform = jax.default_backend()
  target = "tpu" if platform == "tpu" else "gpu"
  if interpret is None:
    interpret = platform not in ("gpu", "tpu")
  return pallas_impl.pallas_grouped_matmul(
      lhs_MI, rhs_GIO, group_sizes_G, target=target, tiles=tiles,
      interpret=interpret)


def _megablox(lhs_MI, rhs_GIO, group_sizes_G, *, tiles, interpret):
  platform = jax.default_backend()
  if interpret is None:
    if platform == "gpu":
      raise ConfigError(
          "matmul='megablox' is a TPU kernel; on GPU use 'pallas' or 'auto'")
    interpret = platform != "tpu"
  return megablox.megablox_grouped_matmul(
      lhs_MI, rhs_GIO, group_sizes_G, tiles=tiles, interpret=interpret)


def _tiled(lhs_MI, rhs_GIO, group_sizes_G, *, tiles, interpret):
  del interpret
  return tiled.tiled_grouped_matmul(lhs_MI, rhs_GIO, group_sizes_G,
                                    tm=tiles[0] if tiles else None)


_IMPLS: dict[str, GroupedMatmul] = {
    "xla": _xla, "pallas": _pallas, "megablox": _megablox, "tiled": _tiled}


def grouped_matmul(lhs_MI: jax.Array, rhs_GIO: jax.Array,
                   group_sizes_G: jax.Array, *, impl: str = "xla",
                   tiles: Tiles | None = None,
                   interpret: bool | None = None) -> jax.Array:
  """[M, I] rows grouped by `group_sizes_G` times [G, I, O] -> [M, O].

  Rows must be sorted by group with sum(group_sizes) <= M; rows past the sum
  come out 0. Differentiable w.r.t. lhs and rhs. lhs and rhs are promoted to a
  common dtype, which is the output's (and the gradients'); the Pallas kernels
  accumulate in float32.

  Args:
    impl: one of MATMUL_IMPLS (see the module docstring).
    tiles: (tm, tk, tn) for pallas/megablox, (tm, ...) for tiled (None: the
      backend's default, shrunk for small dimensions). Each group pads to a multiple of tm rows,
      so the padding waste is at most G * tm rows; tk, tn are register/VMEM
      tiles and must be powers of two on GPU.
    interpret: run Pallas kernels in the interpreter; None = only where no
      GPU/TPU backend can compile them (CPU), so CI runs the real kernel code.
  """
  fn = _IMPLS[resolve_impl(impl)]
  dtype = jnp.result_type(lhs_MI, rhs_GIO)
  lhs_MI, rhs_GIO = lhs_MI.astype(dtype), rhs_GIO.astype(dtype)
  num_rows, num_groups = lhs_MI.shape[0], rhs_GIO.shape[0]
  if num_rows == 0 or num_groups == 0:
    return jnp.zeros((num_rows, rhs_GIO.shape[2]), dtype)
  return fn(lhs_MI, rhs_GIO, group_sizes_G, tiles=tiles, interpret=interpret)
