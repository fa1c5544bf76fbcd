"""E expert FFNs stored as stacked weights [E, D, F] and [E, F, D].

Shapes: E experts, C capacity, D model width, F hidden width, M sorted rows.
"""

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.kernels import check_impl, grouped_matmul
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
  """GELU FFNs, one per expert, applied to capacity buffers or sorted rows.

  Attributes:
    num_experts: E.
    d_model: D.
    d_ff: F, hidden width of each expert.
    dtype: compute dtype (params stay `param_dtype`).
    param_dtype: storage dtype of the weights.
    activation: the nonlinearity between the two matmuls.
    matmul: grouped matmul impl of the dropless path, one of
      `moejax.kernels.MATMUL_IMPLS` (`xla`, `pallas`, `megablox`, `auto`).
    ffn_init: the FFN initializer, the dense FFN's (`moejax.moe.ffn_init`).
  """

  num_experts: int
  d_model: int
  d_ff: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  activation: Callable[[jax.Array], jax.Array] = nn.gelu
  matmul: str = "xla"
  ffn_init: FFNInit = FFNInit()

  def setup(self):
    check_impl(self.matmul)  # Fails loudly on a typo, whichever path runs.
    shape_in = (self.num_experts, self.d_model, self.d_ff)
    shape_out = (self.num_experts, self.d_ff, self.d_model)
    self.w_in = self.param(
        "w_in", nn.with_logical_partitioning(self.ffn_init.w_in,
                                             ("expert", "embed", "mlp")),
        shape_in, self.param_dtype)
    self.w_out = self.param(
        "w_out", nn.with_logical_partitioning(self.ffn_init.w_out,
                                              ("expert", "mlp", "embed")),
        shape_out, self.param_dtype)

  def _weights(self):
    return self.w_in.astype(self.dtype), self.w_out.astype(self.dtype)

  def weights(self) -> tuple[jax.Array, jax.Array]:
    """(w_in [E, D, F], w_out [E, F, D]) in the compute dtype."""
    return self._weights()

  def __call__(self, x_ECD: jax.Array) -> jax.Array:
    """Capacity path: [E, C, D] -> [E, C, D]."""
    return capacity_ffn(x_ECD, *self._weights(), self.activation)

  def grouped(self, x_MD: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    """Dropless path: rows sorted by expert, [M, D] -> [M, D] (unused rows 0)."""
    return grouped_ffn(x_MD, *self._weights(), group_sizes_E, self.activation,
                       ragged_dot=functools.partial(grouped_matmul,
                                                    impl=self.matmul))


def shared_ffn(x_TD: jax.Array, w_in_SDF: jax.Array, w_out_SFD: jax.Array,
               activation: Callable[[jax.Array], jax.Array] = nn.gelu
               ) -> jax.Array:
  """The sum of S dense FFNs over every token: [T, D] -> [T, D], in w's dtype."""
  h_TSF = activation(jnp.einsum("td,sdf->tsf", x_TD.astype(w_in_SDF.dtype),
                                w_in_SDF))
  return jnp.einsum("tsf,sfd->td", h_TSF, w_out_SFD)


class SharedExperts(nn.Module):
  """DeepSeekMoE's shared experts: S FFNs every token uses, outputs summed.

  Stored stacked like the routed experts ([S, D, F], [S, F, D]) but replicated
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
