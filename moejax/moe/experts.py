"""E expert FFNs stored as stacked weights [E, D, F] and [E, F, D].

Shapes: T tokens, D model width, F hidden width, E experts, C capacity, M routed
rows (sorted by expert), Z shared experts.
"""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.moe.ffn_init import FFNInit

Dtype = jnp.dtype | str


def capacity_ffn(x_ECD: jax.Array, w_in_EDF: jax.Array, w_out_EFD: jax.Array,
                 activation: Callable[[jax.Array], jax.Array] = nn.gelu
                 ) -> jax.Array:
  """Capacity buffers through their experts: [E, C, D] -> [E, C, D], in w's dtype.

  A pure function of the weights, so the expert-parallel layer can apply it to
  the local experts inside `shard_map`.
  """
  h_ECF = activation(jnp.einsum("ecd,edf->ecf", x_ECD.astype(w_in_EDF.dtype),
                                w_in_EDF))
  return jnp.einsum("ecf,efd->ecd", h_ECF, w_out_EFD)


def grouped_ffn(x_MD: jax.Array, w_in_EDF: jax.Array, w_out_EFD: jax.Array,
                group_sizes_E: jax.Array,
                activation: Callable[[jax.Array], jax.Array] = nn.gelu,
                ragged_dot: Callable[..., jax.Array] = jax.lax.ragged_dot
                ) -> jax.Array:
  """Rows sorted by expert through their experts: [M, D] -> [M, D] (unused rows 0)."""
  h_MF = activation(ragged_dot(x_MD.astype(w_in_EDF.dtype), w_in_EDF,
                               group_sizes_E))
  return ragged_dot(h_MF, w_out_EFD, group_sizes_E)


class Experts(nn.Module):
  """The stacked weights of E expert FFNs; `capacity_ffn` and `grouped_ffn`
  apply them (so does the expert-parallel layer, to its local experts).

  Attributes:
    num_experts: E.
    d_model: D.
    d_ff: F, hidden width of each expert.
    dtype: compute dtype the weights are returned in (stored as `param_dtype`).
    param_dtype: storage dtype of the weights.
    ffn_init: the FFN initializer, the dense FFN's (`moejax.moe.ffn_init`).
  """

  num_experts: int
  d_model: int
  d_ff: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  ffn_init: FFNInit = FFNInit()

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    """(w_in [E, D, F], w_out [E, F, D]) in the compute dtype."""
    w_in_EDF = self.param(
        "w_in", nn.with_logical_partitioning(self.ffn_init.w_in,
                                             ("expert", "embed", "mlp")),
        (self.num_experts, self.d_model, self.d_ff), self.param_dtype)
    w_out_EFD = self.param(
        "w_out", nn.with_logical_partitioning(self.ffn_init.w_out,
                                              ("expert", "mlp", "embed")),
        (self.num_experts, self.d_ff, self.d_model), self.param_dtype)
    return w_in_EDF.astype(self.dtype), w_out_EFD.astype(self.dtype)


def shared_ffn(x_TD: jax.Array, w_in_ZDF: jax.Array, w_out_ZFD: jax.Array,
               activation: Callable[[jax.Array], jax.Array] = nn.gelu
               ) -> jax.Array:
  """The sum of S dense FFNs over every token: [T, D] -> [T, D], in w's dtype."""
  h_TZF = activation(jnp.einsum("td,zdf->tzf", x_TD.astype(w_in_ZDF.dtype),
                                w_in_ZDF))
  return jnp.einsum("tzf,zfd->td", h_TZF, w_out_ZFD)


class SharedExperts(nn.Module):
  """DeepSeekMoE's shared experts: S FFNs every token uses, outputs summed.

  Stored stacked like the routed experts ([Z, D, F], [Z, F, D]) but replicated
  on every device (no `expert` axis): every token needs all of them.

  Attributes:
    num_shared: S.
    d_model: D.
    d_ff: F of each shared expert (the routed experts' width).
    dtype: compute dtype (params stay `param_dtype`).
    param_dtype: storage dtype of the weights.
    activation: the nonlinearity between the two matmuls.
    ffn_init: the FFN initializer, the routed experts' (`moejax.moe.ffn_init`).
  """

  num_shared: int
  d_model: int
  d_ff: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  activation: Callable[[jax.Array], jax.Array] = nn.gelu
  ffn_init: FFNInit = FFNInit()

  @nn.compact
  def __call__(self, x_TD: jax.Array) -> jax.Array:
    """[T, D] -> [T, D]."""
    w_in = self.param(
        "w_in", nn.with_logical_partitioning(self.ffn_init.w_in,
                                             (None, "embed", "mlp")),
        (self.num_shared, self.d_model, self.d_ff), self.param_dtype)
    w_out = self.param(
        "w_out", nn.with_logical_partitioning(self.ffn_init.w_out,
                                              (None, "mlp", "embed")),
        (self.num_shared, self.d_ff, self.d_model), self.param_dtype)
    return shared_ffn(x_TD, w_in.astype(self.dtype), w_out.astype(self.dtype),
                      self.activation)
