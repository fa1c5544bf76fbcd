"""impl="megablox": jax's TPU grouped matmul `megablox.gmm`, to our contract.

Shapes: M routed rows (padded here to a multiple of tm), I input width, O
output width, G groups.

megablox.gmm (its own custom VJP: dX by gmm with transposed rhs, dW by its
`tgmm`) needs M divisible by tm and leaves rows past sum(group_sizes)
uninitialised in its output and in dX. So we pad M, zero those rows in the
output, and zero their cotangent rows before they reach the caller.
"""

import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax.kernels import tiling

TILES = (128, 128, 128)  # (tm, tk, tn), megablox's own default.


def load_gmm():
  """megablox.gmm, or a ConfigError saying why it cannot be imported."""
  try:
    # Imported lazily: where it is missing, only this impl is unavailable.
    from jax.experimental.pallas.ops.tpu import megablox  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise ConfigError(
        f"matmul='megablox' needs jax.experimental.pallas.ops.tpu.megablox, "
        f"which jax {jax.__version__} cannot import ({err}); use 'pallas' or "
        "'xla'") from None
  return megablox.gmm


def is_available() -> bool:
  try:
    load_gmm()
  except ConfigError:
    return False
  return True


@jax.custom_vjp
def _zero_cotangent_rows(x_MI: jax.Array, valid_M: jax.Array) -> jax.Array:
  """Identity whose VJP zeroes the cotangent rows where ~valid_M."""
  del valid_M
  return x_MI


def _zero_fwd(x_MI, valid_M):
  return x_MI, valid_M


def _zero_bwd(valid_M, dx_MI):
  # A select, not a multiply: the rows we drop may hold NaNs.
  return jnp.where(valid_M[:, None], dx_MI, jnp.zeros_like(dx_MI)), None


_zero_cotangent_rows.defvjp(_zero_fwd, _zero_bwd)


def megablox_grouped_matmul(lhs_MI: jax.Array, rhs_GIO: jax.Array,
                            group_sizes_G: jax.Array, *,
                            tiles: tuple[int, int, int] | None = None,
                            interpret: bool = False) -> jax.Array:
  """[M, I] rows grouped by `group_sizes_G` times [G, I, O] -> [M, O] via megablox.

  float32 or bfloat16 only (megablox's dtypes); rows past the groups come out 0.
  """
  gmm = load_gmm()
  num_rows, d_in = lhs_MI.shape
  tm, tk, tn = tiles or TILES
  # Full-dimension blocks are always legal on TPU; megablox masks ragged I, O.
  tm = min(tm, -(-num_rows // 8) * 8)
  tk, tn = min(tk, d_in), min(tn, rhs_GIO.shape[2])
  x_MI = tiling.pad_to_multiple(lhs_MI, 0, tm)
  group_sizes_G = group_sizes_G.astype(jnp.int32)
  valid_M = jnp.arange(x_MI.shape[0]) < jnp.sum(group_sizes_G)
  x_MI = _zero_cotangent_rows(x_MI, valid_M)
  # Positional: megablox's custom_vjp marks dtype, tiling, transpose_rhs and
  # interpret as non-differentiable by position.
  y_MO = gmm(x_MI, rhs_GIO, group_sizes_G, lhs_MI.dtype, (tm, tk, tn), None,
             None, False, interpret)
  y_MO = jnp.where(valid_M[:, None], y_MO, jnp.zeros_like(y_MO))
  return y_MO[:num_rows]
