"""E expert FFNs stored as stacked weights [E, D, F] and [E, F, D].

Shapes: T tokens, D model width, F hidden width, E experts, C capacity, M routed
rows (sorted by expert), Z shared experts.

Deep experts (`expert_depth` n > 1, StableMoE's) are stacks of n residual FFN
sublayers, stored [E, n, D, F] and [E, n, F, D] (logical axes `expert`,
`expert_depth`, ...): expert e maps a row z_0 of the block's residual stream to
the sum of its sublayers' updates,

  z_j = z_{j-1} + FFN_{e,j}(rms(z_{j-1})),  j = 1..n;  expert(z_0) = z_n - z_0,

so the block computes x + sum_k g_k (E_k(x) - x). This is the expert of the
StableMoE reference code (Hunter-DDM/stablemoe, fairseq/modules/moe_layer.py:
`MoESublayer` is `x + ff2(act(ff1(LayerNorm(x))))`, `nn.Sequential` of
`moe_sublayers` of them per expert, the layer returns `g E(x) + (1 - g) x` on the
raw stream and x for tokens over capacity). moejax's conventions differ in
three places: the norm is RMS without a learned scale (a per-channel scale
folds into w_in, so the function class is the same and the weights stay two
arrays), the FFN is GELU without biases, and the kernels follow `ffn_init`
(the reference zeroes each sublayer's output kernel). Depth 1 is the plain
FFN on the block's normed input, [E, D, F] and [E, F, D], as before.
"""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax.moe.ffn_init import FFNInit

Dtype = jnp.dtype | str
_RMS_EPS = 1e-6  # nn.RMSNorm's default.


def rms_normalize(x: jax.Array) -> jax.Array:
  """x / sqrt(mean(x^2) + eps) over the last axis, computed in float32 (a row of
  zeros, an empty buffer row, stays zero)."""
  x32 = x.astype(jnp.float32)
  scale = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + _RMS_EPS)
  return (x32 * scale).astype(x.dtype)


def residual_stack(ffn: Callable[..., jax.Array], x: jax.Array,
                   w_in: jax.Array, w_out: jax.Array) -> jax.Array:
  """The sum of the updates of n residual sublayers, sublayer j being
  `ffn(rms(z), w_in[:, j], w_out[:, j])` on the running stream z (z starts at x);
  w_in [E, n, D, F], w_out [E, n, F, D]. See the module docstring."""
  z = x.astype(w_in.dtype)
  update = jnp.zeros_like(z)
  for j in range(w_in.shape[1]):
    update = update + ffn(rms_normalize(z), w_in[:, j], w_out[:, j])
    z = x.astype(w_in.dtype) + update
  return update


def capacity_ffn(x_ECD: jax.Array, w_in_EDF: jax.Array, w_out_EFD: jax.Array,
                 activation: Callable[[jax.Array], jax.Array] = nn.gelu
                 ) -> jax.Array:
  """Capacity buffers through their experts: [E, C, D] -> [E, C, D], in w's dtype.

  A pure function of the weights, so the expert-parallel layer can apply it to
  the local experts inside `shard_map`. Deep experts (w_in [E, n, D, F]) return
  their sublayers' summed updates (`residual_stack`).
  """
  if w_in_EDF.ndim == 4:
    return residual_stack(
        lambda x, w_in, w_out: capacity_ffn(x, w_in, w_out, activation),
        x_ECD, w_in_EDF, w_out_EFD)
  h_ECF = activation(jnp.einsum("ecd,edf->ecf", x_ECD.astype(w_in_EDF.dtype),
                                w_in_EDF))
  return jnp.einsum("ecf,efd->ecd", h_ECF, w_out_EFD)


def grouped_ffn(x_MD: jax.Array, w_in_EDF: jax.Array, w_out_EFD: jax.Array,
                group_sizes_E: jax.Array,
                activation: Callable[[jax.Array], jax.Array] = nn.gelu,
                ragged_dot: Callable[..., jax.Array] = jax.lax.ragged_dot
                ) -> jax.Array:
  """Rows sorted by expert through their experts: [M, D] -> [M, D] (unused rows 0);
  deep experts (w_in [E, n, D, F]) as in `capacity_ffn`."""
  if w_in_EDF.ndim == 4:
    return residual_stack(
        lambda x, w_in, w_out: grouped_ffn(x, w_in, w_out, group_sizes_E,
                                           activation, ragged_dot),
        x_MD, w_in_EDF, w_out_EFD)
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
    depth: n, residual FFN sublayers per expert; 1 (one FFN, [E, D, F] and
      [E, F, D]) or more ([E, n, D, F] and [E, n, F, D], see the module
      docstring).
  """

  num_experts: int
  d_model: int
  d_ff: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  ffn_init: FFNInit = FFNInit()
  depth: int = 1

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    """(w_in, w_out) in the compute dtype: [E, D, F] and [E, F, D] at depth 1,
    [E, n, D, F] and [E, n, F, D] at depth n > 1."""
    check_depth(self.depth)
    stack = () if self.depth == 1 else (self.depth,)
    axis = () if self.depth == 1 else ("expert_depth",)
    w_in = self.param(
        "w_in", nn.with_logical_partitioning(
            self.ffn_init.w_in, ("expert", *axis, "embed", "mlp")),
        (self.num_experts, *stack, self.d_model, self.d_ff), self.param_dtype)
    w_out = self.param(
        "w_out", nn.with_logical_partitioning(
            self.ffn_init.w_out, ("expert", *axis, "mlp", "embed")),
        (self.num_experts, *stack, self.d_ff, self.d_model), self.param_dtype)
    return w_in.astype(self.dtype), w_out.astype(self.dtype)


def check_depth(depth) -> None:
  """ConfigError unless `depth` (model.expert_depth) is an integer >= 1."""
  if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
    raise ConfigError(f"model.expert_depth must be an integer >= 1, got {depth!r}")


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
