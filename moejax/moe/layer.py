"""The MoE layer: router -> Routing -> dispatch -> stacked experts -> combine.

Shapes: B batch, L length, T tokens (B*L), D model width, F hidden width,
E experts, C capacity, K top-k slots per token.
"""

import functools
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax.kernels import check_impl, grouped_matmul
from moejax.metrics.router import load_metrics
from moejax.moe import budgets, routed
from moejax.moe.experts import Dtype, Experts, SharedExperts, check_depth
from moejax.moe.ffn_init import FFNInit
from moejax.routing.contract import Router, TokenLayout
from moejax.routing.losses import expert_fractions
from moejax.routing.registry import make_router
from moejax.routing.replay import (REPLAY_COLLECTION, TRACE_FIELDS,
                                   replay_routing, routing_trace)


@flax.struct.dataclass
class MoEAux:
  """What a MoE layer reports besides its output.

  Attributes:
    aux_loss: float32[] the router's weighted auxiliary loss.
    metrics: float32[] router health scalars by name.
    top_expert_T: int32[T] each token's highest-weight used expert (-1: none),
      what routing-fluctuation probes record.
    load_E: float32[E] share of the routed slots each expert received.
    trace: the routing used, `{"expert", "weight", "mask"}` each [T, K]
      (`moejax.routing.replay`).
  """

  aux_loss: jax.Array
  metrics: dict[str, jax.Array]
  top_expert_T: jax.Array
  load_E: jax.Array
  trace: dict[str, jax.Array] = flax.struct.field(default_factory=dict)


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
  Shared experts (DeepSeekMoE), when there are any, process every token and
  their outputs are added to the routed output.

  Deep experts (`expert_depth` n > 1, StableMoE's stacks of residual FFN
  sublayers, `moejax.moe.experts`) run on the block's residual stream
  `residual_BLD` (each sublayer normalises its own input) and return the sum of
  their sublayers' updates, so the block adds sum_k g_k (E_k(x) - x) to x as the
  StableMoE reference does; the router and the shared experts (always one FFN
  each) still read the normed input `x_BLD`.

  Routes recorded earlier can be forced: when the variables hold a `replay`
  collection with this layer's `expert`, `weight` and `mask` [T, K]
  (`moejax.routing.replay`), those slots are dispatched instead of the router's.

  Attributes:
    router: a router name (`moejax.routing.ROUTERS`), built here by
      `moejax.routing.make_router` with E, `top_k`, `vocab_size` and
      `router_options` (which it validates).
    num_experts: E.
    d_ff: F, hidden width of each expert.
    dispatch: `capacity` or `dropless`.
    capacity_factor: C = ceil(capacity_factor * T * K / E) on the capacity path,
      unless the router fixes its own (`Slots.per_expert`).
    dtype: compute dtype of the experts (the router always computes in float32).
    param_dtype: storage dtype of the expert weights.
    matmul: grouped matmul of the dropless path (`moejax.kernels.MATMUL_IMPLS`).
    ffn_init: initializer of the experts (`moejax.moe.ffn_init`).
    mesh: a `("data", "expert")` mesh (`moejax.parallel.make_mesh`) to run
      dispatch -> experts -> combine expert-parallel on, with capacity per
      device (`moejax.parallel.expert_parallel`); None: one program, global plan.
    top_k: K, the router's slots per token.
    router_options: the router's options (its dataclass fields).
    vocab_size: V, for routers that read token ids (hash, stablemoe).
    num_shared_experts: S dense FFNs of width `d_ff` every token also uses
      (replicated, outside the expert-parallel exchange).
    expert_depth: n, residual FFN sublayers per routed expert (1: one FFN).

  Routers whose tokens use a variable number of their K slots
  (`Slots.dense`) cost what the batch uses, not K slots per token
  (`moejax.moe.budgets`).
  """

  router: str
  num_experts: int
  d_ff: int
  dispatch: str = "capacity"
  capacity_factor: float = 1.25
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  matmul: str = "xla"
  mesh: jax.sharding.Mesh | None = None
  top_k: int = 1
  router_options: Mapping[str, Any] | None = None
  vocab_size: int = 0
  num_shared_experts: int = 0
  ffn_init: FFNInit = FFNInit()
  expert_depth: int = 1

  def _router(self) -> Router:
    """The router module, named `router` (its params: `<layer>/router/...`)."""
    if not isinstance(self.router, str):
      raise ConfigError(f"MoELayer(router=...) takes a router name, got "
                        f"{type(self.router).__name__}; give its options as "
                        "router_options={...}")
    return make_router(
        self.router, num_experts=self.num_experts, top_k=self.top_k,
        vocab_size=self.vocab_size, options=dict(self.router_options or {}),
        dispatch=self.dispatch).clone(parent=self, name="router")

  @nn.compact
  def __call__(self, x_BLD: jax.Array, *, token_ids_BL: jax.Array | None = None,
               step: jax.Array | None = None, deterministic: bool = True,
               residual_BLD: jax.Array | None = None
               ) -> tuple[jax.Array, MoEAux]:
    """[B, L, D] -> ([B, L, D], MoEAux); `step` reaches routers with schedules;
    `residual_BLD` [B, L, D], the stream `x_BLD` normalises, feeds deep experts
    (expert_depth > 1, where it is required)."""
    batch, length, d_model = x_BLD.shape
    x_TD = x_BLD.reshape(batch * length, d_model)
    check_depth(self.expert_depth)
    expert_in_TD = x_TD
    if self.expert_depth != 1:
      if residual_BLD is None:
        raise ConfigError(f"MoELayer(expert_depth={self.expert_depth}) runs its "
                          "experts on the residual stream; pass residual_BLD")
      expert_in_TD = residual_BLD.reshape(batch * length, d_model)
    token_ids_T = None if token_ids_BL is None else token_ids_BL.reshape(-1)
    check_impl(self.matmul)  # Fails loudly on a typo, whichever path runs.
    # Checked before routing: a batch the mesh cannot split is the error to
    # report. Init needs only shapes: any token count works, however the mesh
    # splits.
    ffn = routed.RoutedFFN.create(
        self.dispatch, num_tokens=batch * length, num_experts=self.num_experts,
        mesh=None if self.is_initializing() else self.mesh,
        capacity_factor=self.capacity_factor, activation=nn.gelu,
        ragged_dot=functools.partial(grouped_matmul, impl=self.matmul))
    routing = self._router()(
        x_TD, token_ids_T=token_ids_T, step=step,
        layout=TokenLayout(batch, length, routed.token_shards(self.mesh)),
        deterministic=deterministic)
    if self.has_variable(REPLAY_COLLECTION, "expert"):
      routing = replay_routing(routing, {
          f: self.get_variable(REPLAY_COLLECTION, f) for f in TRACE_FIELDS})
    weights = Experts(self.num_experts, d_model, self.d_ff, dtype=self.dtype,
                      param_dtype=self.param_dtype, ffn_init=self.ffn_init,
                      depth=self.expert_depth, name="experts")()
    y_TD, kept_TK = budgets.routed_ffn(ffn, expert_in_TD, routing, *weights)
    if self.num_shared_experts:
      y_TD = y_TD + SharedExperts(
          self.num_shared_experts, d_model, self.d_ff, dtype=self.dtype,
          param_dtype=self.param_dtype, activation=nn.gelu,
          ffn_init=self.ffn_init, name="shared_experts")(x_TD).astype(y_TD.dtype)
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
        load_E=load_E, trace=routing_trace(routing))
