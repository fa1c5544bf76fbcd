"""Top-k routers: Switch (top-1), GShard-style top-k, and DeepSeek-V3-style
sigmoid top-k with an aux-loss-free bias and group-limited routing.

Shapes: T tokens, D model width, E experts, K top-k slots, Q expert groups (of
group-limited routing).
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax.routing import losses
from moejax.routing.balancing import Balancing, parse_policy
from moejax.routing.contract import Router, Routing, TokenLayout, gate_logits

SCORES = ("softmax", "sigmoid")


# How a group of experts is scored for group-limited routing (`group_score`).
GROUP_SCORES = ("paper", "v3_inference")


def group_score_count(rule: str, *, top_k: int, top_groups: int,
                      biased: bool) -> int:
  """How many of a group's best selection scores its group score sums.

  `paper`: the top floor(k / M) (M = `top_groups`): DeepSeek-V3's paper
  (sec. 2.1.2, "the sum of the highest K_r/M affinity scores") and
  Megatron-core's `group_limited_topk`. `v3_inference`: DeepSeek-V3's
  inference Gate, the group's max without a bias (DeepSeek-V2's rule) and its
  top-2 sum with one. Capped at the group's size by the caller.
  """
  if rule == "paper":
    if top_k < top_groups:
      raise ConfigError(f"group_score='paper' sums the top top_k // top_groups "
                        f"scores of a group: needs top_k >= top_groups, got "
                        f"top_k={top_k}, top_groups={top_groups}")
    return top_k // top_groups
  if rule == "v3_inference":
    return 2 if biased else 1
  raise ConfigError(f"router option group_score={rule!r}; choose one of "
                    f"{', '.join(GROUP_SCORES)}")


def group_limited_mask(select_TE: jax.Array, num_groups: int, top_groups: int,
                       group_top: int = 2) -> jax.Array:
  """bool[T, E]: the experts of each token's `top_groups` best expert groups.

  Experts are split into Q contiguous groups (e.g. one per device or node); a
  group's score is the sum of its `group_top` highest selection scores (at
  most the group's size; `group_score_count` gives the references' rules).
  """
  num_tokens, num_experts = select_TE.shape
  per_group = num_experts // num_groups
  # [T, Q, min(group_top, per_group)]: each group's best selection scores.
  best, _ = jax.lax.top_k(select_TE.reshape(num_tokens, num_groups, per_group),
                          min(group_top, per_group))
  score_TQ = jnp.sum(best, axis=-1)
  _, chosen = jax.lax.top_k(score_TQ, top_groups)  # [T, top_groups] group ids.
  keep_TQ = jnp.any(jax.nn.one_hot(chosen, num_groups, dtype=jnp.bool_), 1)
  return jnp.repeat(keep_TQ, per_group, axis=1)


class TopKRouter(Router):
  """Each token goes to the k experts with the highest (biased) scores.

  scores = softmax(W_r h) or sigmoid(W_r h), in float32; the k best of
  scores + b (b: the `bias` policy's per-expert bias, else 0), optionally only
  among the best expert groups; gates = the chosen scores, renormalised to sum
  to 1 when `renormalize` and k > 1, times `routed_scaling`.

  Attributes:
    jitter: multiplicative input noise U(1-eps, 1+eps) in training (Switch), 0: off.
    aux_loss_coef: weight alpha of the balance loss.
    z_loss_coef: weight beta of the router z-loss.
    renormalize: rescale the k gates to sum to 1 (GShard top-2, DeepSeek-V3's
      sigmoid gates); ignored for k=1.
    score: `softmax` or `sigmoid` (DeepSeek-V3).
    routed_scaling: factor on the gates (DeepSeek-V3's routed scaling factor).
    num_groups: split the experts into this many groups for group-limited
      routing (0 or 1: off).
    top_groups: groups each token may use (group-limited routing), M.
    group_score: how a group is scored (`group_score_count`): `paper` (the
      default; the sum of its top floor(k/M) scores, DeepSeek-V3's paper and
      Megatron-core) or `v3_inference` (DeepSeek-V3's inference Gate: its max
      without a bias, its top-2 sum with one).
    balance: balancing policy (`moejax.routing.balancing`): `aux`, `sequence`,
      `global`, `bias`, `none`, or `bias+<loss>`. The loss counts f_i from the
      top-k of the unbiased scores without group limits, as DeepSeek-V3's eq.
      18 and Megatron-core do; the bias steps from the slots actually routed.
    micro_batches: micro-batches of the `aux` loss (0: one per device that
      splits the batch).
    bias_rate: update per step of the `bias` policy's expert bias.
    bias_recenter: keep the expert bias at zero mean.
  """

  jitter: float = 0.0
  aux_loss_coef: float = 1e-2
  z_loss_coef: float = 1e-3
  renormalize: bool = True
  score: str = "softmax"
  routed_scaling: float = 1.0
  num_groups: int = 0
  top_groups: int = 0
  group_score: str = "paper"
  balance: str = "aux"
  micro_batches: int = 0
  bias_rate: float = 1e-3
  bias_recenter: bool = True

  @classmethod
  def check_options(cls, options: dict[str, Any], *, num_experts: int,
                    top_k: int) -> None:
    super().check_options(options, num_experts=num_experts, top_k=top_k)
    if options["score"] not in SCORES:
      raise ConfigError(f"router option score={options['score']!r}; choose one "
                        f"of {', '.join(SCORES)}")
    parse_policy(options["balance"])
    for key in ("micro_batches", "num_groups", "top_groups"):
      if options[key] < 0:
        raise ConfigError(f"router option {key} must be >= 0, got {options[key]}")
    if options["bias_rate"] < 0 or not options["routed_scaling"] > 0:
      raise ConfigError("router options need bias_rate >= 0 and routed_scaling "
                        "> 0")
    groups, top = options["num_groups"], options["top_groups"]
    if groups > 1:
      if num_experts % groups or not 1 <= top <= groups:
        raise ConfigError(
            f"group-limited routing needs num_groups dividing {num_experts} "
            f"experts and 1 <= top_groups <= num_groups, got num_groups={groups}"
            f", top_groups={top}")
      if top_k > top * (num_experts // groups):
        raise ConfigError(f"top_k={top_k} exceeds the {top} groups x "
                          f"{num_experts // groups} experts a token may use")
      group_score_count(options["group_score"], top_k=top_k, top_groups=top,
                        biased=parse_policy(options["balance"]).bias)

  @nn.compact
  def __call__(self, x_TD: jax.Array, *, token_ids_T: jax.Array | None = None,
               step: jax.Array | None = None,
               layout: TokenLayout | None = None,
               deterministic: bool = True) -> Routing:
    del token_ids_T, step  # Routing depends on hidden states only.
    x_TD = x_TD.astype(jnp.float32)
    if self.jitter > 0 and not deterministic:
      noise_TD = jax.random.uniform(
          self.make_rng("router"), x_TD.shape, jnp.float32,
          1.0 - self.jitter, 1.0 + self.jitter)
      x_TD = x_TD * noise_TD
    logits_TE = gate_logits(x_TD, self.num_experts)
    if self.score == "sigmoid":
      scores_TE = jax.nn.sigmoid(logits_TE)
      # The balance loss and entropy read normalised affinities.
      probs_TE = scores_TE / jnp.sum(scores_TE, axis=-1, keepdims=True)
    elif self.score == "softmax":
      scores_TE = probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    else:
      raise ConfigError(f"router option score={self.score!r}; choose one of "
                        f"{', '.join(SCORES)}")
    balancing = Balancing(
        self.num_experts, policy=self.balance, coef=self.aux_loss_coef,
        micro_batches=self.micro_batches, bias_rate=self.bias_rate,
        bias_recenter=self.bias_recenter, name="balance")
    # The bias only chooses experts: it never enters the gates or a gradient.
    select_TE = jax.lax.stop_gradient(scores_TE + balancing.selection_bias())
    if self.num_groups > 1:
      group_top = group_score_count(
          self.group_score, top_k=self.top_k, top_groups=self.top_groups,
          biased=parse_policy(self.balance).bias)
      select_TE = jnp.where(
          group_limited_mask(select_TE, self.num_groups, self.top_groups,
                             group_top), select_TE, -jnp.inf)
    _, expert_TK = jax.lax.top_k(select_TE, self.top_k)
    # f_i of the balance loss: the unbiased top-k without group limits.
    _, unbiased_TK = jax.lax.top_k(jax.lax.stop_gradient(scores_TE), self.top_k)
    weight_TK = jnp.take_along_axis(scores_TE, expert_TK, axis=-1)
    if self.renormalize and self.top_k > 1:
      weight_TK = weight_TK / jnp.sum(weight_TK, axis=-1, keepdims=True)
    weight_TK = weight_TK * self.routed_scaling
    mask_TK = jnp.ones(expert_TK.shape, jnp.bool_)
    balance_loss, metrics = balancing(probs_TE, expert_TK, mask_TK,
                                      layout=layout, training=not deterministic,
                                      loss_expert_TK=unbiased_TK)
    z_loss = losses.router_z_loss(logits_TE)
    return Routing(
        expert_TK=expert_TK.astype(jnp.int32),
        weight_TK=weight_TK,
        mask_TK=mask_TK,
        aux_loss=balance_loss + self.z_loss_coef * z_loss,
        metrics={**metrics, "z_loss": z_loss,
                 "entropy": losses.mean_entropy(probs_TE)})


class SwitchRouter(TopKRouter):
  """Switch Transformer routing: top-1 of a float32 softmax, gate = p_a."""

  top1_only: ClassVar[bool] = True
