"""Load-balancing policies that top-k-style routers plug in.

Shapes: T tokens, E experts, K top-k slots per token.

A policy is a `+`-joined list of at most one balance loss and, optionally,
`bias`:

- `aux`: the Switch/GShard loss E * sum_i f_i P_i per micro-batch, averaged
  over micro-batches. A micro-batch is what one data-parallel device holds (as
  in Megatron-core, MaxText and the micro-batch loss of Qiu et al. 2025): the
  router sees the whole global batch, so the loss is computed on `micro_batches`
  contiguous groups of sequences, by default as many as the devices that split
  the batch (1 without a mesh). Training needs the batch size divisible by
  their number; outside training such a batch (decoding one sequence) is one
  group.
- `sequence`: the same loss per sequence, averaged over sequences (DeepSeek-V3's
  sequence-wise loss, Megatron-core `seq_aux_loss`).
- `global`: the same loss over the whole global batch: f_i counts every token of
  every device (an all-reduce over the `data` and `expert` mesh axes, which XLA
  inserts because the router computes on global arrays), so it is exact under
  data and expert parallelism (Qiu et al. 2025, arXiv 2501.11873).
- `bias`: auxiliary-loss-free balancing (Wang et al. 2024, arXiv 2408.15664;
  DeepSeek-V3): a per-expert bias b_i is added to the scores for choosing the
  top-k only (gates use the scores without it); after each training step
  b_i <- b_i + u * sign(mean_j c_j - c_i) from the step's expert counts c over
  the global batch, optionally recentred to zero mean. b lives in the Flax
  collection `router_state` (not a param): the train step updates it and
  checkpoints save it with the rest of the train state.
- `none`: no balancing.

f_i is the share of the used slots routed to expert i (no gradient; a router
may count other slots, e.g. the top-k router counts the unbiased top-k without
group limits, as DeepSeek-V3's eq. 18 and Megatron-core), P_i the
mean balance score of expert i (the softmax probabilities, or for sigmoid
scores s_i / sum_j s_j as DeepSeek-V3 normalises them).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax.routing import losses
from moejax.routing.contract import (LOSS_COUNTS, ROUTER_STATE, TokenLayout,
                                     accumulating, batch_total)

BALANCE_LOSSES = ("aux", "sequence", "global")
POLICIES = BALANCE_LOSSES + ("bias", "none")


@dataclasses.dataclass(frozen=True)
class BalancePolicy:
  """A parsed policy: which balance loss (None: none) and whether to use a bias."""

  loss: str | None
  bias: bool


def parse_policy(spec: str) -> BalancePolicy:
  """`aux`, `sequence`, `global`, `bias`, `none`, or e.g. `bias+sequence`."""
  parts = [p.strip() for p in str(spec).split("+") if p.strip()]
  bad = [p for p in parts if p not in POLICIES]
  chosen = [p for p in parts if p in BALANCE_LOSSES]
  if not parts or bad or len(chosen) > 1 or ("none" in parts and len(parts) > 1):
    raise ConfigError(
        f"balance={spec!r} is not a policy; use one of {', '.join(POLICIES)}, or "
        "bias plus one loss, e.g. 'bias+sequence'")
  return BalancePolicy(loss=chosen[0] if chosen else None, bias="bias" in parts)


def loss_groups(loss: str, layout: TokenLayout, micro_batches: int = 0, *,
                training: bool = True) -> int:
  """The number of equal token groups the balance loss `loss` averages over.

  Micro-batches shape a training loss only: outside training (evaluation,
  decoding one sequence) a batch they do not split is one group, so the loss
  is still reported and the forward pass never fails on them.
  """
  if loss == "global":
    return 1
  if loss == "sequence":
    return layout.batch
  groups = micro_batches or layout.shards
  if layout.batch % groups:
    if not training:
      return 1
    raise ConfigError(
        f"a batch of {layout.batch} sequences does not split into {groups} "
        "micro-batches for the aux balance loss; make the batch size a multiple "
        "of router_options.micro_batches (default: the devices splitting the "
        "batch)")
  return groups


def grouped_balance_loss(scores_TE: jax.Array, expert_TK: jax.Array,
                         mask_TK: jax.Array, groups: int) -> jax.Array:
  """Mean over `groups` contiguous groups of tokens of E * sum_i f_i P_i."""
  num_tokens = scores_TE.shape[0]
  if num_tokens % groups:
    raise ConfigError(f"{num_tokens} tokens do not split into {groups} groups")

  def split(a):
    return a.reshape(groups, num_tokens // groups, *a.shape[1:])

  per_group = jax.vmap(losses.load_balancing_loss)(
      split(scores_TE), split(expert_TK), split(mask_TK))
  return jnp.mean(per_group)


def balance_loss_from_counts(scores_TE: jax.Array, counts_E: jax.Array
                             ) -> jax.Array:
  """E * sum_i f_i P_i with f = counts_E / sum(counts_E) (counted elsewhere,
  e.g. over a whole accumulated batch) and P the mean of scores_TE."""
  f_E = counts_E / jnp.maximum(jnp.sum(counts_E), 1.0)
  p_E = jnp.mean(scores_TE.astype(jnp.float32), axis=0)
  return scores_TE.shape[-1] * jnp.sum(f_E * p_E)


def expert_counts(expert_TK: jax.Array, mask_TK: jax.Array,
                  num_experts: int) -> jax.Array:
  """float32[E]: used slots routed to each expert."""
  one_hot_TKE = jax.nn.one_hot(expert_TK, num_experts, dtype=jnp.float32)
  return jnp.einsum("tke,tk->e", one_hot_TKE, mask_TK.astype(jnp.float32))


def update_bias(bias_E: jax.Array, counts_E: jax.Array, rate: float,
                recenter: bool = True) -> jax.Array:
  """b + rate * sign(mean(c) - c): raise under-loaded experts, lower overloaded
  ones; with `recenter`, minus the mean so b cannot drift as a whole."""
  bias_E = bias_E + rate * jnp.sign(jnp.mean(counts_E) - counts_E)
  return bias_E - jnp.mean(bias_E) if recenter else bias_E


class Balancing(nn.Module):
  """One router's balancing: its selection bias and its balance loss.

  Attributes:
    num_experts: E.
    policy: see the module docstring (`aux`, `sequence`, `global`, `bias`,
      `none`, or `bias+<loss>`).
    coef: weight alpha of the balance loss.
    micro_batches: micro-batches of the `aux` loss (0: one per device that
      splits the batch); read in training only (`loss_groups`).
    bias_rate: u, the bias update per step (`bias` policies).
    bias_recenter: subtract the mean of b after each update.
  """

  num_experts: int
  policy: str = "aux"
  coef: float = 1e-2
  micro_batches: int = 0
  bias_rate: float = 1e-3
  bias_recenter: bool = True

  def setup(self):
    self._policy = parse_policy(self.policy)
    if self._policy.bias:
      self.expert_bias = self.variable(ROUTER_STATE, "expert_bias", jnp.zeros,
                                       (self.num_experts,), jnp.float32)

  def selection_bias(self) -> jax.Array:
    """float32[E] added to the scores before top-k (zeros without `bias`)."""
    if self._policy.bias:
      return self.expert_bias.value
    return jnp.zeros((self.num_experts,), jnp.float32)

  def __call__(self, scores_TE: jax.Array, expert_TK: jax.Array,
               mask_TK: jax.Array, *, layout: TokenLayout | None,
               training: bool, loss_expert_TK: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(weighted balance loss, metrics); in training with `router_state`
    mutable, also steps the bias from this batch's expert counts.

    The loss counts f_i over `loss_expert_TK` (every slot used) when given,
    e.g. the top-k of the unbiased scores (DeepSeek-V3 eq. 18), else over the
    routed `expert_TK`/`mask_TK`; the bias always steps from the routed slots.
    """
    layout = layout or TokenLayout(batch=1, length=scores_TE.shape[0])
    # Init sees a one-sequence batch: any grouping is as good as another.
    if self.is_initializing():
      layout = TokenLayout(batch=layout.batch, length=layout.length)
    loss = self._policy.loss
    # Without a loss the global value is still reported, for comparisons.
    groups = loss_groups(loss or "global", layout,
                         0 if self.is_initializing() else self.micro_batches,
                         training=training)
    if loss_expert_TK is None:
      counted_TK, counted_mask_TK = expert_TK, mask_TK
    else:
      counted_TK = loss_expert_TK
      counted_mask_TK = jnp.ones(loss_expert_TK.shape, jnp.bool_)
    if loss == "global" and training and accumulating(self):
      # f over the whole accumulated batch: its counts come from the step.
      counts_E = batch_total(self, LOSS_COUNTS, expert_counts(
          counted_TK, counted_mask_TK, self.num_experts))
      balance = balance_loss_from_counts(scores_TE, counts_E)
    else:
      balance = grouped_balance_loss(scores_TE, counted_TK, counted_mask_TK,
                                     groups)
    metrics = {"balance_loss": balance}
    if self._policy.bias:
      bias_E = self.expert_bias.value
      metrics["expert_bias_range"] = jnp.max(bias_E) - jnp.min(bias_E)
      if (training and self.is_mutable_collection(ROUTER_STATE)
          and not self.is_initializing()):
        counts_E = batch_total(self, "bias_counts", expert_counts(
            expert_TK, mask_TK, self.num_experts))
        self.expert_bias.value = update_bias(bias_E, counts_E, self.bias_rate,
                                             self.bias_recenter)
    weighted = self.coef * balance if loss else jnp.zeros((), jnp.float32)
    return weighted, metrics
