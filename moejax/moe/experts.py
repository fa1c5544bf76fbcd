"""E expert FFNs stored as stacked weights [E, D, F] and [E, F, D].

Shapes: E experts, C capacity, D model width, F hidden width, M sorted rows.
"""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype | str

EXPERT_INIT = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
    batch_axis=(0,))


class Experts(nn.Module):
  """GELU FFNs, one per expert, applied to capacity buffers or sorted rows.

  Attributes:
    num_experts: E.
    d_model: D.
    d_ff: F, hidden width of each expert.
    dtype: compute dtype (params stay `param_dtype`).
    param_dtype: storage dtype of the weights.
    activation: the nonlinearity between the two matmuls.
  """

  num_experts: int
  d_model: int
  d_ff: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  activation: Callable[[jax.Array], jax.Array] = nn.gelu

  def setup(self):
    shape_in = (self.num_experts, self.d_model, self.d_ff)
    shape_out = (self.num_experts, self.d_ff, self.d_model)
    self.w_in = self.param(
        "w_in", nn.with_logical_partitioning(EXPERT_INIT, ("expert", "embed", "mlp")),
        shape_in, self.param_dtype)
    self.w_out = self.param(
        "w_out", nn.with_logical_partitioning(EXPERT_INIT, ("expert", "mlp", "embed")),
        shape_out, self.param_dtype)

  def _weights(self):
    return self.w_in.astype(self.dtype), self.w_out.astype(self.dtype)

  def __call__(self, x_ECD: jax.Array) -> jax.Array:
    """Capacity path: [E, C, D] -> [E, C, D]."""
    w_in_EDF, w_out_EFD = self._weights()
    h_ECF = self.activation(jnp.einsum("ecd,edf->ecf", x_ECD.astype(self.dtype),
                                       w_in_EDF))
    return jnp.einsum("ecf,efd->ecd", h_ECF, w_out_EFD)

  def grouped(self, x_MD: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    """Dropless path: rows sorted by expert, [M, D] -> [M, D] (unused rows 0)."""
    w_in_EDF, w_out_EFD = self._weights()
    h_MF = self.activation(jax.lax.ragged_dot(x_MD.astype(self.dtype), w_in_EDF,
                                              group_sizes_E))
    return jax.lax.ragged_dot(h_MF, w_out_EFD, group_sizes_E)
