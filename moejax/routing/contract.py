"""The router contract: every router maps tokens to a `Routing` pytree.

Shapes: T tokens, D model width, E experts, K routing slots per token.

A router is a Flax module `router(x_TD, *, token_ids_T, deterministic) -> Routing`
(plus `step=` or `layout=` for routers that declare they need them).
Slot k of token t sends the token to expert `expert_TK[t, k]` with weight
`weight_TK[t, k]` when `mask_TK[t, k]` is set. Dispatch and combine read only this
pytree, so a new router is one small module plus its registry entry.
"""

import dataclasses
from typing import Any, ClassVar

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.errors import ConfigError

# The Flax collection of non-gradient router state (the aux-loss-free expert
# bias, ReMoE's L1 coefficient): the train step applies the model with it
# mutable and keeps the result in `TrainState.model_state`; checkpoints save it.
ROUTER_STATE = "router_state"


@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """How the T = batch * length tokens a router sees are laid out.

  Attributes:
    batch: B sequences (rows of T, each `length` tokens, row-major).
    length: L tokens per sequence.
    shards: devices that split the batch (each holds B / shards rows); 1
      without a mesh. Micro-batch balance losses use one group per shard.
  """

  batch: int
  length: int
  shards: int = 1


def gate_logits(x_TD: jax.Array, num_experts: int) -> jax.Array:
  """float32[T, E] = h W_r, W_r a [D, E] param `gate/kernel` (no bias, init
  N(0, 0.02)); call it inside a router's compact `__call__`."""
  return nn.Dense(
      num_experts, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
      name="gate", kernel_init=nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ("embed", None)))(
              x_TD.astype(jnp.float32))


@flax.struct.dataclass
class Routing:
  """What a router decided for T tokens.

  Attributes:
    expert_TK: int32[T, K] expert of each slot.
    weight_TK: float32[T, K] combine weight of each slot.
    mask_TK: bool[T, K] whether the slot is used (sent to its expert).
    aux_loss: float32[] the router's weighted auxiliary loss; the model adds it to
      the task loss exactly once.
    metrics: float32[] diagnostics by name (e.g. `balance_loss`, `z_loss`,
      `entropy`), reported per layer under `router/`.
    capacity: static per-expert capacity fixed by the router itself (expert
      choice); None lets the capacity path use ceil(cf * T * K / E).
    sparse_slots: static; True when a token uses a variable number of its K
      slots, most of them unused (K = E slots with a mask: DTS, DSelect-k,
      expert choice). The MoE layer then pays only for the slots the batch
      uses (docs/moe_layer.md, "Slot budgets").
    fixed_slots: static; with `sparse_slots`, the number of leading slots that
      (nearly) every token uses, e.g. DSelect-k's k best experts once its
      codes are binary (docs/moe_layer.md, "Fixed slots stay outside the
      switch").
  """

  expert_TK: jax.Array
  weight_TK: jax.Array
  mask_TK: jax.Array
  aux_loss: jax.Array
  metrics: dict[str, jax.Array]
  capacity: int | None = flax.struct.field(pytree_node=False, default=None)
  sparse_slots: bool = flax.struct.field(pytree_node=False, default=False)
  fixed_slots: int = flax.struct.field(pytree_node=False, default=0)

  def expert_weights(self, num_experts: int) -> jax.Array:
    """float32[T, E]: each expert's combine weight, summed over the used slots
    that name it (0 for the experts a token does not use)."""
    w_TK = jnp.where(self.mask_TK, self.weight_TK, 0.0).astype(jnp.float32)
    return jnp.einsum("tk,tke->te", w_TK,
                      jax.nn.one_hot(self.expert_TK, num_experts,
                                     dtype=jnp.float32))


class Router(nn.Module):
  """Base class of all routers: holds the fields every router receives.

  `num_experts`, `top_k` and `vocab_size` are set by the model; every other
  dataclass field of a subclass is an option (`model.router_options`).

  Subclasses implement `__call__(x_TD, *, token_ids_T=None, deterministic=True)`
  and may narrow the class attributes below, which the registry and the MoE
  layer use to reject combinations that cannot work.
  """

  num_experts: int
  top_k: int = 1
  vocab_size: int = 0  # V, for routers that read token ids (0: not given).

  # Dispatch paths this router's routing can feed.
  dispatch_paths: ClassVar[tuple[str, ...]] = ("capacity", "dropless")
  # Whether the router reads token ids (hash, distilled routers).
  needs_token_ids: ClassVar[bool] = False
  # Whether `__call__` takes `step=` (steps into the current training stage),
  # for routers with schedules (the DTS gate's temperature).
  needs_step: ClassVar[bool] = False
  # Whether `__call__` takes `layout=` (a TokenLayout), for balance losses
  # over sequences or micro-batches.
  needs_layout: ClassVar[bool] = False
  # Routers that send each token to one expert reject model.top_k > 1.
  top1_only: ClassVar[bool] = False
  # What model.top_k means for this router (said in errors).
  top_k_means: ClassVar[str] = "experts per token"

  @classmethod
  def prepare_state(cls, model_state: dict, *, num_experts: int, options: dict,
                    token_counts_V) -> dict:
    """Called by the trainer after init with the training corpus's token counts
    (int[V]); returns `model_state` with corpus-dependent constants set. Most
    routers have none."""
    del num_experts, options, token_counts_V
    return model_state

  @classmethod
  def phases(cls, options: dict[str, Any], stage_steps: int
             ) -> tuple[tuple[int, dict[str, Any]], ...]:
    """The router's static phases in a stage of `stage_steps` steps:
    ((first stage step, option overrides), ...), ascending from (0, {}).

    From its first step on, a phase's overrides must route exactly as
    `options` (every option, defaults included) do, and may do it with static
    shapes that follow that phase's sparsity; the trainer compiles one train
    step per phase (`moejax.train.program`). Most routers have one phase.
    """
    del options, stage_steps
    return ((0, {}),)

  @classmethod
  def check_options(cls, options: dict[str, Any], *, num_experts: int,
                    top_k: int) -> None:
    """Raises ConfigError for option values that cannot work (`options` holds
    every option, defaults included). Most routers check nothing here."""
    del options, num_experts, top_k

  @classmethod
  def check(cls, num_experts: int, top_k: int) -> None:
    """Raises ConfigError when (num_experts, top_k) cannot work for this router;
    subclasses with further constraints extend it."""
    if num_experts < 1:
      raise ConfigError(f"model.num_experts must be positive, got {num_experts}")
    if not 1 <= top_k <= num_experts:
      raise ConfigError(
          f"model.top_k={top_k} must be between 1 and model.num_experts="
          f"{num_experts} (top_k: {cls.top_k_means}); lower model.top_k or add "
          "experts")
