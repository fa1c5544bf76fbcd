"""BASE layers (Lewis et al. 2021): a balanced linear assignment of tokens to experts.

Shapes: T tokens, D model width, E experts, N = T/E tokens per expert (the
expert's N "copies" in the assignment problem), K = 1 slot per token.

Training solves max sum_t h_t . w_{a(t)} subject to every expert taking exactly
N tokens, with a parallel (Jacobi) forward auction over the T expert copies;
evaluation routes each token to its argmax expert. The gate is
sigmoid(h_t . w_a); there is no auxiliary loss. (The reference, fairseq's
libbase, runs the mirrored auction in which experts bid for tokens, with the
same eps rule.)
"""

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax.routing import losses
from moejax.routing.contract import Router, Routing


def _auction(scores_TE, copies, eps, max_rounds):
  """Forward auction from zero prices; returns (owner_EN, rounds), owner T = none.

  Each round every unassigned token bids for the cheapest copy of its best
  expert, raising that copy's price to (best value - second value + eps); the
  second value also counts the expert's second-cheapest copy. The bidders of
  one expert, highest bid first, take its copies cheapest first while their bid
  beats the copy's price by eps (the top bidder always wins), which keeps every
  holder within eps of its best value (eps-complementary slackness).
  """
  num_tokens, num_experts = scores_TE.shape
  tokens_T = jnp.arange(num_tokens, dtype=jnp.int32)

  def cond(state):
    owner_EN, _, rounds = state
    return (rounds < max_rounds) & (jnp.sum(owner_EN < num_tokens) < num_tokens)

  def body(state):
    owner_EN, price_EN, rounds = state
    # Cheapest copies first, so column 0 is the price a new bidder pays.
    price_EN, owner_EN = jax.lax.sort((price_EN, owner_EN), dimension=1,
                                      num_keys=1)
    held_T = jnp.zeros(num_tokens + 1, jnp.bool_).at[owner_EN.reshape(-1)].set(
        True)[:num_tokens]
    value_TE = scores_TE - price_EN[:, 0]
    best_T = jnp.argmax(value_TE, axis=1)
    is_best_TE = jnp.arange(num_experts) == best_T[:, None]
    other_T = jnp.max(jnp.where(is_best_TE, -jnp.inf, value_TE), axis=1)
    score_T = jnp.sum(jnp.where(is_best_TE, scores_TE, 0.0), axis=1)
    second_copy_T = (score_T - price_EN[best_T, 1] if copies > 1
                     else jnp.full_like(score_T, -jnp.inf))
    second_T = jnp.maximum(other_T, second_copy_T)
    bid_T = score_T - second_T + eps
    # Rank the bidders of each expert, highest bid first.
    group_T = jnp.where(held_T, num_experts, best_T)
    group_sorted, _, token_sorted = jax.lax.sort(
        (group_T, -bid_T, tokens_T), num_keys=2)
    counts_G = jnp.bincount(group_T, length=num_experts + 1)
    starts_G = jnp.cumsum(counts_G) - counts_G
    rank_T = jnp.zeros_like(tokens_T).at[token_sorted].set(
        tokens_T - starts_G[group_sorted])
    copy_T = jnp.minimum(rank_T, copies - 1)
    wins_T = (~held_T) & (rank_T < copies) & (
        (rank_T == 0) | (bid_T >= price_EN[best_T, copy_T] + eps))
    # Winners overwrite the copy's owner; the displaced owner bids next round.
    slot_T = jnp.where(wins_T, best_T * copies + rank_T, num_experts * copies)
    owner_EN = owner_EN.reshape(-1).at[slot_T].set(tokens_T, mode="drop").reshape(
        num_experts, copies)
    price_EN = price_EN.reshape(-1).at[slot_T].set(bid_T, mode="drop").reshape(
        num_experts, copies)
    return owner_EN, price_EN, rounds + 1

  owner_EN = jnp.full((num_experts, copies), num_tokens, jnp.int32)
  price_EN = jnp.zeros((num_experts, copies), jnp.float32)
  owner_EN, _, rounds = jax.lax.while_loop(
      cond, body, (owner_EN, price_EN, jnp.int32(0)))
  return owner_EN, rounds


def balanced_assignment(scores_TE: jax.Array, *, eps_ratio: float = 0.02,
                        eps_floor: float = 1e-4, max_rounds: int = 1000
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """int32[T] expert per token, each expert exactly T/E tokens, max summed score.

  Auction with eps = max(eps_ratio * R, eps_floor, 1e-6 * R), R = max - min of
  the row-centred scores (the BASE reference uses eps_ratio 1/50, floor 1e-4;
  the 1e-6 * R floor keeps bids above float32 rounding). Bound: when the
  auction finishes, the total score is within T * eps of the optimum of the
  assignment problem with every expert repeated T/E times (Bertsekas); random
  problems land far closer (~2% of the bound). If `max_rounds` runs out first,
  the tokens still unassigned fill the free copies in order (balance holds, the
  bound may not); `stats["unfinished"]` reports their share.

  Returns (expert_T, stats) with stats float32 scalars `eps`, `rounds`,
  `unfinished`. No gradient flows through the assignment.
  """
  num_tokens, num_experts = scores_TE.shape
  if num_tokens % num_experts:
    raise ConfigError(
        f"balanced assignment needs T={num_tokens} divisible by "
        f"E={num_experts}")
  copies = num_tokens // num_experts
  scores_TE = jax.lax.stop_gradient(scores_TE.astype(jnp.float32))
  # Non-finite scores would never lose a bid; treat them as the worst score.
  finite = jnp.isfinite(scores_TE)
  worst = jnp.min(jnp.where(finite, scores_TE, jnp.inf))
  scores_TE = jnp.where(finite, scores_TE, worst)
  # A per-token shift changes every feasible total by the same constant, so
  # centring rows keeps the optimum and keeps prices small (float32 precision).
  scores_TE = scores_TE - jnp.max(scores_TE, axis=1, keepdims=True)
  spread = -jnp.min(scores_TE)
  eps = jnp.maximum(eps_ratio * spread, jnp.maximum(eps_floor, 1e-6 * spread))
  if num_experts == 1:
    return jnp.zeros(num_tokens, jnp.int32), {
        "eps": eps, "rounds": jnp.float32(0), "unfinished": jnp.float32(0)}
  owner_EN, rounds = _auction(scores_TE, copies, eps, max_rounds)
  owner_S = owner_EN.reshape(-1)
  # Fallback when max_rounds ran out: the i-th unassigned token takes the i-th
  # free copy, so every expert still gets exactly T/E tokens.
  held_T = jnp.zeros(num_tokens + 1, jnp.bool_).at[owner_S].set(True)[:num_tokens]
  free_S = owner_S == num_tokens
  waiting = jnp.argsort(held_T, stable=True)  # Unassigned tokens first.
  free_rank_S = jnp.cumsum(free_S) - 1
  owner_S = jnp.where(free_S, waiting[free_rank_S], owner_S)
  expert_S = jnp.arange(num_tokens, dtype=jnp.int32) // copies
  expert_T = jnp.zeros(num_tokens, jnp.int32).at[owner_S].set(expert_S)
  return expert_T, {
      "eps": eps, "rounds": rounds.astype(jnp.float32),
      "unfinished": jnp.mean(~held_T).astype(jnp.float32)}


class BaseLayerRouter(Router):
  """BASE layer routing: balanced auction in training, argmax in evaluation.

  Affinity s_{t,i} = h_t . w_i (float32) with learned expert embeddings w_i
  (orthogonal init, gain 0.1, as the reference); combine weight
  sigmoid(s_{t,a_t}), which is where the embeddings get their gradient.
  Training routes each expert exactly T/E tokens and sets Routing.capacity to
  that count, so the capacity path drops nothing; evaluation is greedy and uses
  the layer's capacity factor like Switch.

  Attributes:
    eps_ratio, eps_floor, max_rounds: the auction's settings (see
      `balanced_assignment`); total affinity within T * eps of the optimum.
    pad_unbalanced: when T is not divisible by E in training, auction the first
      (T // E) * E tokens and route the last T % E greedily (False: ConfigError).
  """

  eps_ratio: float = 0.02
  eps_floor: float = 1e-4
  max_rounds: int = 1000
  pad_unbalanced: bool = False

  top1_only: ClassVar[bool] = True

  def __post_init__(self):
    if not (self.eps_ratio > 0 and self.eps_floor > 0 and self.max_rounds >= 1):
      raise ConfigError(
          "router 'base' needs eps_ratio > 0, eps_floor > 0 and max_rounds >= 1, "
          f"got {self.eps_ratio}, {self.eps_floor}, {self.max_rounds}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x_TD: jax.Array, *, token_ids_T: jax.Array | None = None,
               deterministic: bool = True) -> Routing:
    del token_ids_T  # Routing depends on hidden states only.
    num_tokens, d_model = x_TD.shape
    num_experts = self.num_experts
    w_ED = self.param(
        "expert_embeddings",
        nn.with_logical_partitioning(nn.initializers.orthogonal(scale=0.1),
                                     (None, "embed")),
        (num_experts, d_model), jnp.float32)
    scores_TE = jnp.einsum("td,ed->te", x_TD.astype(jnp.float32), w_ED)
    greedy_T = jnp.argmax(scores_TE, axis=-1).astype(jnp.int32)
    stats = {}
    capacity = None
    if not deterministic:
      balanced = (num_tokens // num_experts) * num_experts
      leftover = num_tokens - balanced
      if leftover and not self.pad_unbalanced:
        raise ConfigError(
            f"router 'base' needs the tokens per step T={num_tokens} divisible by "
            f"model.num_experts={num_experts} in training; change batch size or "
            "sequence length, or set router option pad_unbalanced=True")
      if balanced:
        auction_T, stats = balanced_assignment(
            scores_TE[:balanced], eps_ratio=self.eps_ratio,
            eps_floor=self.eps_floor, max_rounds=self.max_rounds)
        greedy_T = jnp.concatenate([auction_T, greedy_T[balanced:]])
      # Greedy leftovers can pile on one expert: T//E + T%E holds them all.
      capacity = num_tokens // num_experts + leftover
    expert_TK = greedy_T[:, None]
    score_TK = jnp.take_along_axis(scores_TE, expert_TK, axis=1)
    probs_TE = jax.nn.softmax(scores_TE, axis=-1)
    metrics = {"entropy": losses.mean_entropy(probs_TE),
               "mean_affinity": jnp.mean(score_TK)}
    metrics.update({f"auction_{k}": v for k, v in stats.items()})
    return Routing(
        expert_TK=expert_TK,
        weight_TK=jax.nn.sigmoid(score_TK),
        mask_TK=jnp.ones((num_tokens, 1), jnp.bool_),
        aux_loss=jnp.zeros((), jnp.float32),
        metrics=metrics,
        capacity=capacity)

