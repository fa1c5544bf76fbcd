"""Expert-choice routing (Zhou et al. 2022): each expert picks its top-C tokens.

Shapes: T tokens, D model width, E experts, C capacity (tokens per expert),
K top-k slots per token (E of them: slot e is expert e).

Balance is exact by construction: every expert processes exactly C tokens, and a
token may be picked by 0..E experts. The selection reads every token of the
batch, so in a causal LM a token's routing depends on later tokens (a known
property of expert choice, discussed in the paper); use it knowingly.
"""

import math

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax.routing import losses
from moejax.routing.contract import Router, Routing, Slots, TokenLayout


def expert_choice_capacity(num_tokens: int, num_experts: int, top_k: int,
                           capacity_factor: float) -> int:
  """C = ceil(capacity_factor * T * top_k / E), clipped to [1, T]."""
  capacity = math.ceil(capacity_factor * num_tokens * top_k / num_experts)
  return min(num_tokens, max(1, capacity))


def expert_choice_routing(probs_TE: jax.Array, capacity: int
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each expert e takes the C tokens with the largest probs_TE[:, e].

  Returns token-major (expert_TK, weight_TK, mask_TK) with K = E: slot e of token
  t is expert e, weighted probs_TE[t, e], used iff expert e chose token t.
  """
  num_tokens, num_experts = probs_TE.shape
  _, token_EC = jax.lax.top_k(probs_TE.T, capacity)
  expert_EC = jnp.broadcast_to(jnp.arange(num_experts)[:, None], token_EC.shape)
  mask_TE = jnp.zeros((num_tokens, num_experts), jnp.bool_).at[
      token_EC, expert_EC].set(True)
  expert_TE = jnp.broadcast_to(
      jnp.arange(num_experts, dtype=jnp.int32), (num_tokens, num_experts))
  return expert_TE, probs_TE, mask_TE


class ExpertChoiceRouter(Router):
  """S = softmax(W h) in float32; expert e keeps its C highest-scoring tokens.

  `top_k` is the average number of experts per token: C = ceil(capacity_factor
  * T * top_k / E) (the paper's EC-CF2 is top_k=2, capacity_factor=1). The
  router fixes `Slots.per_expert` = C, so the capacity path allocates exactly C
  rows per expert and drops nothing; the MoE layer's own capacity_factor is not
  used. Combine weight of a chosen (token, expert) pair = S[t, e]. No balance
  loss is needed.

  Attributes:
    capacity_factor: scales C; C is clipped to [1, T].
    z_loss_coef: weight of the router z-loss (0: off, the paper uses none).
  """

  capacity_factor: float = 1.0
  z_loss_coef: float = 0.0

  top_k_means: ClassVar[str] = "the average number of experts per token"


  @classmethod
  def check_options(cls, options: dict[str, Any], *, num_experts: int,
                    top_k: int) -> None:
    super().check_options(options, num_experts=num_experts, top_k=top_k)
    if not options["capacity_factor"] > 0:
      raise ConfigError(
          f"router 'expert_choice' needs capacity_factor > 0, got "
          f"{options['capacity_factor']}")

  @nn.compact
  def __call__(self, x_TD: jax.Array, *, token_ids_T: jax.Array | None = None,
               step: jax.Array | None = None,
               layout: TokenLayout | None = None,
               deterministic: bool = True) -> Routing:
    del token_ids_T, step, layout, deterministic  # One rule throughout.
    logits_TE = nn.Dense(
        self.num_experts, use_bias=False, dtype=jnp.float32,
        param_dtype=jnp.float32, name="gate",
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("embed", None)))(
                x_TD.astype(jnp.float32))
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    capacity = expert_choice_capacity(x_TD.shape[0], self.num_experts,
                                      self.top_k, self.capacity_factor)
    expert_TK, weight_TK, mask_TK = expert_choice_routing(probs_TE, capacity)
    z_loss = losses.router_z_loss(logits_TE)
    experts_per_token_T = jnp.sum(mask_TK, axis=-1)
    return Routing(
        expert_TK=expert_TK,
        weight_TK=weight_TK,
        mask_TK=mask_TK,
        aux_loss=self.z_loss_coef * z_loss,
        metrics={"z_loss": z_loss, "entropy": losses.mean_entropy(probs_TE),
                 # Tokens no expert chose: only the residual carries them.
                 "unrouted_frac": jnp.mean(experts_per_token_T == 0).astype(
                     jnp.float32)},
        slots=Slots(per_expert=capacity, dense=0))
