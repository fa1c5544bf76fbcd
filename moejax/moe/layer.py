"""The MoE layer: router -> Routing -> dispatch -> stacked experts -> combine.

Shapes: B batch, L length, T = B*L tokens, D model width, F hidden width,
E experts, C capacity, K slots per token.
"""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax.kernels import grouped_matmul
from moejax.metrics.router import load_metrics
from moejax.moe import dispatch
from moejax.moe.experts import Dtype, Experts
from moejax.moe.ffn_init import FFNInit
from moejax.parallel import expert_parallel
from moejax.routing.contract import Router
from moejax.routing.losses import expert_fractions


@flax.struct.dataclass
class MoEAux:
  """What a MoE layer reports besides its output.

  Attributes:
    aux_loss: float32[] the router's weighted auxiliary loss.
    metrics: float32[] router health scalars by name.
    top_expert_T: int32[T] each token's highest-weight used expert (-1: none),
      what routing-fluctuation probes record.
    load_E: float32[E] share of the routed slots each expert received.
  """

  aux_loss: jax.Array
  metrics: dict[str, jax.Array]
  top_expert_T: jax.Array
  load_E: jax.Array


def top_expert(expert_TK: jax.Array, weight_TK: jax.Array,
               mask_TK: jax.Array) -> jax.Array:
  """int32[T]: the used slot with the largest weight per token, -1 if none."""
  score_TK = jnp.where(mask_TK, weight_TK.astype(jnp.float32), -jnp.inf)
  best_T = jnp.argmax(score_TK, axis=-1)
  chosen_T = jnp.take_along_axis(expert_TK, best_T[:, None], axis=-1)[:, 0]
  return jnp.where(mask_TK.any(axis=-1), chosen_T, -1).astype(jnp.int32)


class MoELayer(nn.Module):
  """A sparse FFN: each token is processed by the experts its router picks.

  Tokens dropped for capacity get 0 here; the block's residual carries them.

  Attributes:
    router: an unbound router module (see `moejax.routing.make_router`).
    num_experts: E.
    d_ff: F, hidden width of each expert.
    dispatch: `capacity` or `dropless`.
    capacity_factor: C = ceil(capacity_factor * T * K / E) on the capacity path,
      unless the router fixes its own capacity (`Routing.capacity`).
    dtype: compute dtype of the experts (the router always computes in float32).
    param_dtype: storage dtype of the expert weights.
    matmul: grouped matmul of the dropless path (`moejax.kernels.MATMUL_IMPLS`).
    ffn_init: initializer of the experts (`moejax.moe.ffn_init`).
    mesh: a `("data", "expert")` mesh (`moejax.parallel.make_mesh`) to run
      dispatch -> experts -> combine expert-parallel on, with capacity per
      device (`moejax.parallel.expert_parallel`); None: one program, global plan.
  """

  router: Router
  num_experts: int
  d_ff: int
  dispatch: str = "capacity"
  capacity_factor: float = 1.25
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  matmul: str = "xla"
  mesh: jax.sharding.Mesh | None = None
  ffn_init: FFNInit = FFNInit()

  @nn.compact
  def __call__(self, x_BLD: jax.Array, *, token_ids_BL: jax.Array | None = None,
               step: jax.Array | None = None,
               deterministic: bool = True) -> tuple[jax.Array, MoEAux]:
    """[B, L, D] -> ([B, L, D], MoEAux); `step` reaches routers with schedules."""
    if self.dispatch not in dispatch.DISPATCH_PATHS:
      raise ConfigError(
          f"unknown dispatch {self.dispatch!r}; valid: "
          f"{', '.join(dispatch.DISPATCH_PATHS)}")
    batch, length, d_model = x_BLD.shape
    x_TD = x_BLD.reshape(batch * length, d_model)
    token_ids_T = None if token_ids_BL is None else token_ids_BL.reshape(-1)
    extra = {"step": step} if self.router.needs_step else {}
    routing = self.router(x_TD, token_ids_T=token_ids_T,
                          deterministic=deterministic, **extra)
    experts = Experts(self.num_experts, d_model, self.d_ff, dtype=self.dtype,
                      param_dtype=self.param_dtype, matmul=self.matmul,
                      ffn_init=self.ffn_init, name="experts")
    # Init needs only shapes: any token count works, however the mesh splits.
    if self.mesh is not None and not self.is_initializing():
      w_in_EDF, w_out_EFD = experts.weights()
      y_TD, kept_TK = expert_parallel.expert_parallel_ffn(
          x_TD, routing, w_in_EDF, w_out_EFD, mesh=self.mesh,
          dispatch_path=self.dispatch, capacity_factor=self.capacity_factor,
          activation=experts.activation,
          ragged_dot=functools.partial(grouped_matmul, impl=experts.matmul))
    elif self.dispatch == "capacity":
      _, top_k = routing.expert_TK.shape
      capacity = routing.capacity or dispatch.expert_capacity(
          x_TD.shape[0], self.num_experts, top_k, self.capacity_factor)
      plan = dispatch.plan_capacity(routing.expert_TK, routing.mask_TK,
                                    self.num_experts, capacity)
      y_ECD = experts(dispatch.dispatch_capacity(x_TD, plan))
      y_TD = dispatch.combine_capacity(y_ECD, plan, routing.weight_TK)
      kept_TK = plan.kept_TK
    else:
      plan = dispatch.plan_dropless(routing.expert_TK, routing.mask_TK,
                                    self.num_experts)
      y_MD = experts.grouped(dispatch.dispatch_sorted(x_TD, plan),
                             plan.group_sizes_E)
      y_TD = dispatch.combine_sorted(y_MD, plan, routing.weight_TK,
                                     routing.mask_TK)
      kept_TK = routing.mask_TK
    metrics = dict(routing.metrics)
    load_E = expert_fractions(routing.expert_TK, routing.mask_TK,
                              self.num_experts)
    metrics.update(load_metrics(load_E, routing.mask_TK, kept_TK))
    metrics["aux_loss"] = routing.aux_loss
    y_BLD = y_TD.reshape(batch, length, d_model).astype(x_BLD.dtype)
    return y_BLD, MoEAux(
        aux_loss=routing.aux_loss, metrics=metrics,
        top_expert_T=top_expert(routing.expert_TK, routing.weight_TK,
                                routing.mask_TK),
        load_E=load_E)
