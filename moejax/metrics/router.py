"""Router health statistics computed inside the jitted step (scalars only).

Shapes: T tokens, E experts, K top-k slots per token.
"""

import jax
import jax.numpy as jnp


def load_metrics(load_E: jax.Array, mask_TK: jax.Array,
                 kept_TK: jax.Array) -> dict[str, jax.Array]:
  """Balance and drop statistics of one MoE layer from its load fractions.

  Returns float32[] scalars:
    load_max_over_mean: max over experts of routed slots / mean (1.0 = balanced).
    load_p99_over_mean: 99th percentile over experts of routed slots (linear
      interpolation between the sorted loads) / mean.
    load_cv: coefficient of variation of the routed slots per expert.
    dead_experts: number of experts that received no routed slot.
    drop_frac: share of routed slots dropped for capacity.
  """
  num_experts = load_E.shape[0]
  mean = 1.0 / num_experts
  routed = jnp.sum(mask_TK.astype(jnp.float32))
  kept = jnp.sum(kept_TK.astype(jnp.float32))
  return {
      "load_max_over_mean": jnp.max(load_E) / mean,
      "load_p99_over_mean": jnp.percentile(load_E, 99.0) / mean,
      "load_cv": jnp.std(load_E) / mean,
      "dead_experts": jnp.sum((load_E <= 0).astype(jnp.float32)),
      "drop_frac": jnp.where(routed > 0, 1.0 - kept / jnp.maximum(routed, 1.0), 0.0),
  }
