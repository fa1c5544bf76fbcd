"""The router contract: every router maps tokens to a `Routing` pytree.

Shapes: T tokens, D model width, E experts, K top-k routing slots per token,
V vocabulary.

A router is a Flax module called one way by every layer,
`router(x_TD, *, token_ids_T, step, layout, deterministic) -> Routing`; each
router uses what it needs of that context and ignores the rest.
Slot k of token t sends the token to expert `expert_TK[t, k]` with weight
`weight_TK[t, k]` when `mask_TK[t, k]` is set. Dispatch and combine read only this
pytree, so a new router is one small module plus its registry entry.
"""

import dataclasses
from typing import Any, Callable, ClassVar

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.errors import ConfigError

# The Flax collection of non-gradient router state (the aux-loss-free expert
# bias, ReMoE's L1 coefficient): the train step applies the model with it
# mutable and keeps the result in `TrainState.model_state`; checkpoints save it.
ROUTER_STATE = "router_state"

# The Flax collection through which an accumulated train step
# (`moejax.train.accumulate`) gives a router the counts of its step's other
# micro-batches, so that state updates and whole-batch losses see the whole
# batch: each entry is float32 counts (sums over tokens). Absent outside
# gradient accumulation. An entry named `LOSS_COUNTS` feeds a loss in every
# micro-step, so the step counts it over the whole batch first (a counts-only
# forward pass); the other entries feed state updates, kept from the last
# micro-step only, which sees the counts of all the others.
BATCH_COUNTS = "batch_counts"
LOSS_COUNTS = "loss_counts"


def accumulating(module: nn.Module) -> bool:
  """Whether `module` runs inside an accumulated train step's forward pass."""
  return (module.is_mutable_collection(BATCH_COUNTS)
          and not module.is_initializing())


def batch_total(module: nn.Module, name: str, own: jax.Array) -> jax.Array:
  """`own` counts plus those of the step's other micro-batches (`own` alone
  outside accumulation); also reports `own` to the accumulating step."""
  if not accumulating(module):
    return own
  others = (module.get_variable(BATCH_COUNTS, name)
            if module.has_variable(BATCH_COUNTS, name) else jnp.zeros_like(own))
  module.put_variable(BATCH_COUNTS, name, own)
  return own + others


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


@dataclasses.dataclass(frozen=True)
class Slots:
  """A routing's cost hint: the most its slots can fill, the same on both
  dispatch paths (`moejax.moe.budgets`, `moejax.moe.routed`).

  Attributes:
    per_expert: the most slots one expert receives, fixed by the router
      (expert choice and BASE: C tokens each; DSelect-k: T); the capacity path
      allocates that many rows per expert and drops nothing. None: the layer's
      capacity factor sets it.
    dense: the leading slots (nearly) every token uses; the rest are sparse and
      the layer pays for the ones a batch uses. None: every token uses all K
      (one static program). 0: all K are sparse (the DTS gate, ReMoE, expert
      choice); k > 0: the first k are computed at a static size and only the
      others at a run-time budget (DSelect-k's k heaviest experts).
  """

  per_expert: int | None = None
  dense: int | None = None

  def sparse(self, top_k: int) -> bool:
    """Whether some of the K slots are sparse (budgets apply)."""
    return self.dense is not None and self.dense < top_k


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
    slots: static; what of its [T, K] slots the routing can use (`Slots`),
      so that the MoE layer allocates no more (docs/moe_layer.md, "The seams").
  """

  expert_TK: jax.Array
  weight_TK: jax.Array
  mask_TK: jax.Array
  aux_loss: jax.Array
  metrics: dict[str, jax.Array]
  slots: Slots = flax.struct.field(pytree_node=False, default=Slots())

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

  One call signature for every router:
  `__call__(x_TD, *, token_ids_T=None, step=None, layout=None,
  deterministic=True) -> Routing`, the context being the token ids [T], the
  step into the current stage (schedules), the `TokenLayout` (balance losses
  over sequences or micro-batches) and whether this is training; a router
  ignores what it does not read. Build routers with `make_router`, which
  validates their options once (`check_options`).
  """

  num_experts: int
  top_k: int = 1
  vocab_size: int = 0  # V, for routers that read token ids (0: not given).

  # The name the registry knows it by (set there), said in errors.
  router_name: ClassVar[str] = "router"
  # Dispatch paths this router's routing can feed.
  dispatch_paths: ClassVar[tuple[str, ...]] = ("capacity", "dropless")
  # Routers that send each token to one expert reject model.top_k > 1.
  top1_only: ClassVar[bool] = False
  # What model.top_k means for this router (said in errors).
  top_k_means: ClassVar[str] = "experts per token"

  @classmethod
  def phases(cls, options: dict[str, Any], stage_steps: int
             ) -> tuple[tuple[int, dict[str, Any]], ...]:
    """The router's static phases in a stage of `stage_steps` steps:
    ((first stage step, option overrides), ...), ascending from (0, {}).

    From its first step on, a phase's overrides must route exactly as
    `options` (every option, defaults included) do, and may do it with static
    shapes that follow that phase's sparsity; the stage machine makes each
    phase a segment of the stage, compiled on its own
    (`moejax.stages.plan.segments`). Most routers have one phase.
    """
    del options, stage_steps
    return ((0, {}),)

  @classmethod
  def init_transform(cls, options: dict[str, Any], *, num_experts: int
                     ) -> Callable[[dict, Any], dict] | None:
    """`(model_state, token_counts_V) -> model_state`, setting the router state
    that depends on the training corpus (int[V] token counts) in a fresh
    state; the stage machine applies it at init
    (`moejax.stages.plan.init_transform`). None (most routers): nothing to set.
    """
    del options, num_experts
    return None

  @classmethod
  def check_options(cls, options: dict[str, Any], *, num_experts: int,
                    top_k: int) -> None:
    """The one validation hook (`make_router` and the config call it): raises
    ConfigError for sizes or option values that cannot work (`options` holds
    every option, defaults included). Subclasses extend it (super() first)."""
    del options
    if num_experts < 1:
      raise ConfigError(f"model.num_experts must be positive, got {num_experts}")
    if not 1 <= top_k <= num_experts:
      raise ConfigError(
          f"model.top_k={top_k} must be between 1 and model.num_experts="
          f"{num_experts} (top_k: {cls.top_k_means}); lower model.top_k or add "
          "experts")
    if cls.top1_only and top_k != 1:
      raise ConfigError(f"router {cls.router_name!r} sends each token to one "
                        f"expert but model.top_k={top_k}; set model.top_k=1")

  @classmethod
  def check_dispatch(cls, path: str) -> None:
    """ConfigError when this router's routing cannot feed dispatch `path`."""
    if path not in cls.dispatch_paths:
      raise ConfigError(
          f"router {cls.router_name!r} supports dispatch "
          f"{', '.join(cls.dispatch_paths)}, not {path!r}")
