"""StableMoE routing (Dai et al., ACL 2022): learn and distill, then freeze.

Shapes: T tokens, D model width, F hidden width (of the distilled router,
`distill_dim`: 50), E experts, K top-k slots (1), V vocabulary.

Stage 1 (training): greedy assignment a_t = argmax_i e_i . h_t (no gradient through
the choice), gate sigma(e_a . h_t), balance loss, and a distilled router over token
ids, D(x_t) . ê_i, trained by cross-entropy to a_t. Stage 2: route by the distilled
router (frozen by the stage machine), the gate sigma(e_a . h_t) still trains.
Evaluation routes with the distilled router in both stages, as the reference does.

Losses are per token: the reference sums them over the batch and divides every loss
by the token count, which is the mean used here.
"""

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from moejax.errors import ConfigError
from moejax.routing import losses
from moejax.routing.contract import Router, Routing, TokenLayout

# Param names under `<moe layer>/router`: freezing rules match these.
DISTILLED_PARAMS = ("distill_embedding", "distill_centroids")
FREEZE_DISTILLED = r".*/router/distill_(embedding|centroids)$"


def stablemoe_balance_loss(scores_TE: jax.Array, expert_T: jax.Array) -> jax.Array:
  """(1/T) sum_i ((|A_i| - n̄)/n̄) sum_{t in A_i} sigma(s_{t,i}), n̄ = T/E.

  The count ratio is a constant; the gradient flows only through sigma: an
  overloaded expert's scores are pushed down, an underloaded one's up.
  """
  num_tokens, num_experts = scores_TE.shape
  counts_E = jnp.bincount(expert_T, length=num_experts).astype(jnp.float32)
  mean = num_tokens / num_experts
  ratio_E = (counts_E - mean) / mean
  chosen_T = jnp.take_along_axis(scores_TE, expert_T[:, None], axis=1)[:, 0]
  return jnp.sum(ratio_E[expert_T] * jax.nn.sigmoid(chosen_T)) / num_tokens


class StableMoERouter(Router):
  """Top-1 routing of StableMoE; `stage` 1 learns and distills, 2 is frozen.

  Attributes:
    stage: 1 (greedy centroid routing + balance and distillation losses) or 2
      (routing by the distilled router, no auxiliary loss).
    balance_alpha: weight alpha of the balance loss (0.3 in the paper).
    distill_weight: weight of the distillation cross-entropy (0.3).
    distill_dim: width R of the token-id embedding of the distilled router (50).
  """

  stage: int = 1
  balance_alpha: float = 0.3
  distill_weight: float = 0.3
  distill_dim: int = 50

  top1_only: ClassVar[bool] = True


  @nn.compact
  def __call__(self, x_TD: jax.Array, *, token_ids_T: jax.Array | None = None,
               step: jax.Array | None = None,
               layout: TokenLayout | None = None,
               deterministic: bool = True) -> Routing:
    if self.stage not in (1, 2):
      raise ConfigError(f"router 'stablemoe' option stage={self.stage}; use 1 or 2")
    if token_ids_T is None or self.vocab_size <= 0:
      raise ConfigError("router 'stablemoe' needs token ids and the vocabulary "
                        "size; pass token_ids and vocab_size to the MoE layer")
    d_model = x_TD.shape[-1]
    init = nn.initializers.orthogonal(scale=0.1)
    centroids_DE = self.param(
        "centroids", nn.with_logical_partitioning(init, ("embed", None)),
        (d_model, self.num_experts), jnp.float32)
    embedding_VF = self.param(
        "distill_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", None)),
        (self.vocab_size, self.distill_dim), jnp.float32)
    distill_FE = self.param(
        "distill_centroids", nn.with_logical_partitioning(init, (None, None)),
        (self.distill_dim, self.num_experts), jnp.float32)

    scores_TE = x_TD.astype(jnp.float32) @ centroids_DE
    distill_TE = embedding_VF[token_ids_T] @ distill_FE
    greedy_T = jnp.argmax(jax.lax.stop_gradient(scores_TE), axis=-1)
    distilled_T = jnp.argmax(distill_TE, axis=-1)
    learning = self.stage == 1 and not deterministic
    expert_T = (greedy_T if learning else distilled_T).astype(jnp.int32)
    gate_T = jax.nn.sigmoid(
        jnp.take_along_axis(scores_TE, expert_T[:, None], axis=1)[:, 0])

    zero = jnp.zeros((), jnp.float32)
    if learning:
      balance = stablemoe_balance_loss(scores_TE, expert_T)
      distill = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
          distill_TE, expert_T))
      aux = self.balance_alpha * balance + self.distill_weight * distill
    else:
      balance = distill = aux = zero
    return Routing(
        expert_TK=expert_T[:, None], weight_TK=gate_T[:, None],
        mask_TK=jnp.ones((x_TD.shape[0], 1), jnp.bool_), aux_loss=aux,
        metrics={
            "balance_loss": balance, "distill_loss": distill,
            "distill_agreement": jnp.mean(
                (distilled_T == greedy_T).astype(jnp.float32)),
            "entropy": losses.mean_entropy(jax.nn.softmax(scores_TE, axis=-1)),
        })

