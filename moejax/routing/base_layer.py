"""BASE layers (Lewis et al. 2021): a balanced linear assignment of tokens to experts.

Shapes: T tokens, D model width, E experts, C capacity (T / E tokens per expert:
the expert's C "copies" or places in the assignment problem), K top-k slots (1
per token), Y steps (the phases of eps-scaling).

Training solves max sum_t h_t . w_{a(t)} subject to every expert taking exactly
C tokens, with a parallel (Jacobi) forward auction in which each expert is one
object with C places and one price; evaluation routes each token to its argmax
expert. The gate is
sigmoid(h_t . w_a); there is no auxiliary loss. (The reference, fairseq's
libbase, runs the mirrored auction in which experts bid for tokens, with the
same eps rule.)
"""

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax.routing import losses
from moejax.routing.contract import Router, Routing, Slots, TokenLayout


def _auction_round(expert_T, bid_T, price_E, scores_TE, eps, copies):
  """One Jacobi round of the forward auction; returns (expert_T, bid_T, price_E).

  An expert is one object with `copies` places and one price. Every
  unassigned token bids for its best expert the price at which its second-best
  expert would be as good, plus eps. Each expert keeps its `copies` highest
  bids among its holders and new bidders (the others are unassigned); once
  full, its price is its lowest kept bid. A holder's bid is at least its
  expert's price and was eps above its second-best value, and other prices
  only rise: every holder stays within eps of its best value (eps-complementary
  slackness). One price per expert (not per place) lets an expert take all
  its places in one round, however warm the prices.
  """
  num_tokens, num_experts = scores_TE.shape
  tokens_T = jnp.arange(num_tokens, dtype=jnp.int32)
  value_TE = scores_TE - price_E
  best_T = jnp.argmax(value_TE, axis=1)
  is_best_TE = jnp.arange(num_experts) == best_T[:, None]
  second_T = jnp.max(jnp.where(is_best_TE, -jnp.inf, value_TE), axis=1)
  score_T = jnp.sum(jnp.where(is_best_TE, scores_TE, 0.0), axis=1)
  free_T = expert_T == num_experts
  expert_T = jnp.where(free_T, best_T, expert_T)
  bid_T = jnp.where(free_T, score_T - second_T + eps, bid_T)
  # Rank each expert's candidates, highest bid first (token order on ties).
  expert_sorted, neg_bid_sorted, token_sorted = jax.lax.sort(
      (expert_T, -bid_T, tokens_T), num_keys=2)
  counts_E = jnp.bincount(expert_T, length=num_experts)
  starts_E = jnp.cumsum(counts_E) - counts_E
  rank_T = jnp.zeros_like(tokens_T).at[token_sorted].set(
      tokens_T - starts_E[expert_sorted].astype(jnp.int32))
  lowest_kept_E = -neg_bid_sorted[jnp.minimum(starts_E + copies - 1,
                                              num_tokens - 1)]
  price_E = jnp.where(counts_E >= copies, lowest_kept_E, price_E)
  expert_T = jnp.where(rank_T < copies, expert_T, num_experts)
  return expert_T, bid_T, price_E


def _scaled_auction(scores_TE, copies, eps_Y, max_rounds):
  """Auction at each eps of the decreasing eps_Y in turn (eps-scaling).

  Each phase starts with every token unassigned and keeps the previous phase's
  prices, already close to the final ones, so the last phase at the target eps
  needs few rounds. Returns (expert_T of the last phase that finished, its eps,
  rounds, share of tokens unassigned when the rounds ran out); expert E = none
  where no phase finished.
  """
  num_tokens, num_experts = scores_TE.shape
  none_T = jnp.full((num_tokens,), num_experts, jnp.int32)
  num_phases = eps_Y.shape[0]

  def cond(state):
    phase, rounds = state[3], state[4]
    return (phase < num_phases) & (rounds < max_rounds)

  def body(state):
    expert_T, bid_T, price_E, phase, rounds, done_T, done_eps = state
    eps = eps_Y[phase]
    expert_T, bid_T, price_E = _auction_round(expert_T, bid_T, price_E,
                                              scores_TE, eps, copies)
    complete = jnp.all(expert_T < num_experts)
    return (jnp.where(complete, none_T, expert_T), bid_T, price_E,
            phase + complete.astype(jnp.int32), rounds + 1,
            jnp.where(complete, expert_T, done_T),
            jnp.where(complete, eps, done_eps))

  state = (none_T, jnp.zeros((num_tokens,), jnp.float32),
           jnp.zeros((num_experts,), jnp.float32), jnp.int32(0), jnp.int32(0),
           none_T, eps_Y[0])
  expert_T, _, _, phase, rounds, done_T, done_eps = jax.lax.while_loop(
      cond, body, state)
  left = jnp.where(phase < num_phases, jnp.mean(expert_T == num_experts), 0.0)
  return done_T, done_eps, rounds, left.astype(jnp.float32)


def balanced_assignment(scores_TE: jax.Array, *, eps_ratio: float = 0.02,
                        eps_floor: float = 1e-4,
                        max_rounds: int | jax.Array = 1000,
                        eps_scaling: float = 1.0
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """int32[T] expert per token, each expert exactly T/E tokens, max summed score.

  Auction with target eps = max(eps_ratio * R, eps_floor, 1e-6 * R), R = max -
  min of the row-centred scores (the BASE reference uses eps_ratio 1/50, floor
  1e-4; the 1e-6 * R floor keeps bids above float32 rounding), reached by
  optional eps-scaling: phases at eps = max(target, R / eps_scaling^p), p = 0,
  1, ..., each warm-started from the previous phase's prices (`eps_scaling` 1,
  the default: one phase at the target). With one price per expert the
  auction needs few rounds from zero prices (14-105 on 2048 x 8 problems,
  random, clustered or sharing one direction); scaling by 4 or 8 took more
  rounds in total on the same problems, so it is off by default.

  Bound (Bertsekas): the returned assignment's total score is within T * eps
  of the optimum of the assignment problem with every expert repeated T/E times,
  where eps = `stats["eps"]`: the target eps when the last phase finished
  within `max_rounds` (`stats["unfinished"]` = 0); otherwise the eps of the
  last phase that finished, whose assignment is returned. If no phase
  finished, tokens fill the copies in order (balance holds) and eps = R, which
  bounds any assignment (each token loses at most R). Problems land far inside
  the bound (gaps of 0.1-1% of it against scipy on random ones).

  Returns (expert_T, stats) with stats float32 scalars `eps` (the bound's eps),
  `eps_target`, `rounds`, `unfinished` (share of tokens the target phase left
  unassigned; 0 when it finished). No gradient flows through the assignment.
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
        "eps": eps, "eps_target": eps, "rounds": jnp.float32(0),
        "unfinished": jnp.float32(0)}
  # R / eps_scaling^p reaches the target by p = log(1/eps_ratio) / log(scaling);
  # the last phase is at the target.
  num_phases = 1
  if eps_scaling > 1:
    num_phases += max(0, math.ceil(math.log(1 / eps_ratio) /
                                   math.log(eps_scaling)))
  eps_Y = jnp.maximum(eps, spread * float(eps_scaling) ** -jnp.arange(
      num_phases, dtype=jnp.float32)).at[-1].set(eps)
  expert_T, done_eps, rounds, left = _scaled_auction(scores_TE, copies, eps_Y,
                                                     max_rounds)
  finished = jnp.all(expert_T < num_experts)
  # No phase finished: the i-th token takes the i-th place (balance holds).
  expert_T = jnp.where(finished, expert_T,
                       jnp.arange(num_tokens, dtype=jnp.int32) // copies)
  bound_eps = jnp.where(finished, done_eps, jnp.maximum(spread, eps_Y[0]))
  return expert_T, {
      "eps": bound_eps, "eps_target": eps, "rounds": rounds.astype(jnp.float32),
      "unfinished": left}


class BaseLayerRouter(Router):
  """BASE layer routing: balanced auction in training, argmax in evaluation.

  Affinity s_{t,i} = h_t . w_i (float32) with learned expert embeddings w_i
  (orthogonal init, gain 0.1, as the reference); combine weight
  sigmoid(s_{t,a_t}), which is where the embeddings get their gradient.
  Training routes each expert exactly T/E tokens and sets `Slots.per_expert` to
  that count, so the capacity path drops nothing; evaluation is greedy and uses
  the layer's capacity factor like Switch.

  Attributes:
    eps_ratio, eps_floor, max_rounds, eps_scaling: the auction's settings (see
      `balanced_assignment`); total affinity within T * eps of the optimum,
      eps reported as `router/auction_eps` (the target eps unless
      `router/auction_unfinished` > 0).
    pad_unbalanced: when T is not divisible by E in training, auction the first
      (T // E) * E tokens and route the last T % E greedily (False: ConfigError).
  """

  eps_ratio: float = 0.02
  eps_floor: float = 1e-4
  max_rounds: int = 1000
  eps_scaling: float = 1.0
  pad_unbalanced: bool = False

  top1_only: ClassVar[bool] = True

  @classmethod
  def check_options(cls, options: dict[str, Any], *, num_experts: int,
                    top_k: int) -> None:
    super().check_options(options, num_experts=num_experts, top_k=top_k)
    o = options
    if not (o["eps_ratio"] > 0 and o["eps_floor"] > 0 and o["max_rounds"] >= 1
            and o["eps_scaling"] >= 1):
      raise ConfigError(
          "router 'base' needs eps_ratio > 0, eps_floor > 0, max_rounds >= 1 and "
          f"eps_scaling >= 1 (1: off), got {o['eps_ratio']}, {o['eps_floor']}, "
          f"{o['max_rounds']}, {o['eps_scaling']}")

  @nn.compact
  def __call__(self, x_TD: jax.Array, *, token_ids_T: jax.Array | None = None,
               step: jax.Array | None = None,
               layout: TokenLayout | None = None,
               deterministic: bool = True) -> Routing:
    del token_ids_T, step, layout  # Routing depends on hidden states only.
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
            eps_floor=self.eps_floor, max_rounds=self.max_rounds,
            eps_scaling=self.eps_scaling)
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
        slots=Slots(per_expert=capacity))

