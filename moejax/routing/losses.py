"""Auxiliary losses and statistics of routers, as public pure functions.

Shapes: T tokens, E experts, K top-k slots per token.
"""

import jax
import jax.numpy as jnp


def expert_fractions(expert_TK: jax.Array, mask_TK: jax.Array,
                     num_experts: int) -> jax.Array:
  """float32[E]: share of the used slots sent to each expert (sums to 1)."""
  one_hot_TKE = jax.nn.one_hot(expert_TK, num_experts, dtype=jnp.float32)
  counts_E = jnp.einsum("tke,tk->e", one_hot_TKE, mask_TK.astype(jnp.float32))
  return counts_E / jnp.maximum(counts_E.sum(), 1.0)


def load_balancing_loss(probs_TE: jax.Array, expert_TK: jax.Array,
                        mask_TK: jax.Array) -> jax.Array:
  """Switch/GShard balance loss E * sum_i f_i * P_i (1.0 when perfectly uniform).

  f_i is the share of used slots routed to expert i (counted, so no gradient) and
  P_i the mean router probability of expert i, which carries the gradient. For
  top-k routers f counts all k slots, so f sums to 1 for any k.
  """
  num_experts = probs_TE.shape[-1]
  f_E = expert_fractions(expert_TK, mask_TK, num_experts)
  p_E = probs_TE.astype(jnp.float32).mean(axis=0)
  return num_experts * jnp.sum(f_E * p_E)


def router_z_loss(logits_TE: jax.Array) -> jax.Array:
  """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2."""
  lse_T = jax.nn.logsumexp(logits_TE.astype(jnp.float32), axis=-1)
  return jnp.mean(lse_T**2)


def mean_entropy(probs_TE: jax.Array) -> jax.Array:
  """Mean over tokens of the entropy (nats) of the router distribution."""
  p = probs_TE.astype(jnp.float32)
  return -jnp.mean(jnp.sum(p * jnp.log(jnp.maximum(p, 1e-9)), axis=-1))
