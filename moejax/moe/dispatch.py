"""Dispatch and combine: moving tokens to experts and results back.

Shapes: T tokens, D model width, E experts, K slots per token, C capacity,
M = T*K routed rows.

Two paths read the same `Routing` pytree:
- capacity: each expert gets a buffer of C rows, filled slot-major (every token's
  first choice before any second choice, GShard priority) and in token order;
  slots over capacity are dropped and the residual carries those tokens.
- dropless: slots are sorted by expert into one [M, D] matrix with per-expert group
  sizes, for a grouped matmul; nothing is dropped.
"""

import math

import flax
import jax
import jax.numpy as jnp

DISPATCH_PATHS = ("capacity", "dropless")


def expert_capacity(num_tokens: int, num_experts: int, top_k: int,
                    capacity_factor: float) -> int:
  """C = ceil(capacity_factor * T * K / E), at least 1."""
  return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


@flax.struct.dataclass
class CapacityPlan:
  """Where each slot lands in the [E * C] buffer rows.

  Attributes:
    slot_TK: int32[T, K] buffer row of each slot; E*C (a zero row) when dropped.
    kept_TK: bool[T, K] slot used and within capacity.
    token_EC: int32[E, C] token filling each buffer row; T (a zero row) if empty.
  """

  slot_TK: jax.Array
  kept_TK: jax.Array
  token_EC: jax.Array


def _rank_within_group(group_M: jax.Array, num_groups: int) -> jax.Array:
  """int32[M]: how many earlier entries share each entry's group (stable order)."""
  order_M = jnp.argsort(group_M, stable=True)
  counts_G = jnp.bincount(group_M, length=num_groups)
  starts_G = jnp.cumsum(counts_G) - counts_G
  rank_sorted_M = jnp.arange(group_M.shape[0]) - starts_G[group_M[order_M]]
  return jnp.zeros_like(group_M).at[order_M].set(rank_sorted_M)


def plan_capacity(expert_TK: jax.Array, mask_TK: jax.Array, num_experts: int,
                  capacity: int) -> CapacityPlan:
  """Assigns buffer rows slot-major, token order within a slot, up to C each."""
  num_tokens, top_k = expert_TK.shape
  # Slot-major flattening: index m = k * T + t.
  expert_M = jnp.where(mask_TK, expert_TK, num_experts).T.reshape(-1)
  rank_M = _rank_within_group(expert_M, num_experts + 1)
  kept_M = (expert_M < num_experts) & (rank_M < capacity)
  dropped_row = num_experts * capacity
  slot_M = jnp.where(kept_M, expert_M * capacity + rank_M, dropped_row)
  token_M = jnp.arange(top_k * num_tokens, dtype=jnp.int32) % num_tokens
  token_rows = jnp.full((dropped_row + 1,), num_tokens, jnp.int32)
  token_EC = token_rows.at[slot_M].set(token_M)[:dropped_row].reshape(
      num_experts, capacity)
  return CapacityPlan(
      slot_TK=slot_M.reshape(top_k, num_tokens).T.astype(jnp.int32),
      kept_TK=kept_M.reshape(top_k, num_tokens).T,
      token_EC=token_EC)


def dispatch_capacity(x_TD: jax.Array, plan: CapacityPlan) -> jax.Array:
  """Gathers tokens into expert buffers: [T, D] -> [E, C, D] (empty rows zero)."""
  x_padded = jnp.concatenate([x_TD, jnp.zeros_like(x_TD[:1])], axis=0)
  return x_padded[plan.token_EC]


def combine_capacity(y_ECD: jax.Array, plan: CapacityPlan,
                     weight_TK: jax.Array) -> jax.Array:
  """Weighted sum of each token's kept expert outputs: [E, C, D] -> [T, D]."""
  num_experts, capacity, d = y_ECD.shape
  y_rows = jnp.concatenate(
      [y_ECD.reshape(num_experts * capacity, d), jnp.zeros((1, d), y_ECD.dtype)])
  y_TKD = y_rows[plan.slot_TK]
  w_TK = jnp.where(plan.kept_TK, weight_TK, 0.0).astype(y_ECD.dtype)
  return jnp.einsum("tkd,tk->td", y_TKD, w_TK)


@flax.struct.dataclass
class SortPlan:
  """Slots sorted by expert for a grouped matmul.

  Attributes:
    token_M: int32[M] token of each sorted row (unused slots sort last).
    inverse_TK: int32[T, K] sorted row of each slot.
    group_sizes_E: int32[E] rows per expert; rows past their sum are unused.
  """

  token_M: jax.Array
  inverse_TK: jax.Array
  group_sizes_E: jax.Array


def plan_dropless(expert_TK: jax.Array, mask_TK: jax.Array,
                  num_experts: int) -> SortPlan:
  """Sorts the T*K slots by expert (stable), unused slots after all experts."""
  num_tokens, top_k = expert_TK.shape
  expert_M = jnp.where(mask_TK, expert_TK, num_experts).reshape(-1)
  order_M = jnp.argsort(expert_M, stable=True)
  inverse_M = jnp.zeros_like(order_M).at[order_M].set(
      jnp.arange(order_M.shape[0], dtype=order_M.dtype))
  group_sizes_E = jnp.bincount(expert_M, length=num_experts + 1)[:num_experts]
  return SortPlan(
      token_M=(order_M // top_k).astype(jnp.int32),
      inverse_TK=inverse_M.reshape(num_tokens, top_k).astype(jnp.int32),
      group_sizes_E=group_sizes_E.astype(jnp.int32))


def dispatch_sorted(x_TD: jax.Array, plan: SortPlan) -> jax.Array:
  """Gathers each slot's token in expert order: [T, D] -> [M, D]."""
  return x_TD[plan.token_M]


def combine_sorted(y_MD: jax.Array, plan: SortPlan, weight_TK: jax.Array,
                   mask_TK: jax.Array) -> jax.Array:
  """Weighted sum of each token's expert outputs: [M, D] -> [T, D]."""
  y_TKD = y_MD[plan.inverse_TK]
  w_TK = jnp.where(mask_TK, weight_TK, 0.0).astype(y_MD.dtype)
  return jnp.einsum("tkd,tk->td", y_TKD, w_TK)
