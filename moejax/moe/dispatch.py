"""Dispatch and combine: moving tokens to experts and results back.

Shapes: T tokens, D model width, E experts, K top-k slots per token, C capacity,
G groups (the experts, plus one for dropped slots), M routed rows (at most
T*K), R buffer rows, S slots (T*K flattened).

Two paths read the same `Routing` pytree:
- capacity: each expert gets a buffer of C rows, filled slot-major (every token's
  first choice before any second choice, GShard priority) and in token order;
  slots over capacity are dropped and the residual carries those tokens.
- dropless: slots are sorted by expert into one [M, D] matrix with per-expert group
  sizes, for a grouped matmul; nothing is dropped.

Both plans take `rows`, the rows actually allocated (per expert on the capacity
path, in all on the dropless path), so that routers whose K slots are mostly
unused pay only for the used ones (`moejax.moe.budgets`); the default allocates
for every slot. Combine reads whichever side is smaller: the [T, K] slots
(a gather) or the allocated rows (a scatter-add), so its cost follows the rows
too.
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
    source_EC: int32[E, C] slot (t * K + k) filling each buffer row; T * K if
      empty.
  """

  slot_TK: jax.Array
  kept_TK: jax.Array
  token_EC: jax.Array
  source_EC: jax.Array


def _rank_within_group(group_M: jax.Array, num_groups: int) -> jax.Array:
  """int32[M]: how many earlier entries share each entry's group (stable order)."""
  order_M = jnp.argsort(group_M, stable=True)
  counts_G = jnp.bincount(group_M, length=num_groups)
  starts_G = jnp.cumsum(counts_G) - counts_G
  rank_sorted_M = jnp.arange(group_M.shape[0]) - starts_G[group_M[order_M]]
  return jnp.zeros_like(group_M).at[order_M].set(rank_sorted_M)


def plan_capacity(expert_TK: jax.Array, mask_TK: jax.Array, num_experts: int,
                  capacity: int, rows: int | None = None) -> CapacityPlan:
  """Assigns buffer rows slot-major, token order within a slot, up to C each.

  `rows` (default C) is the buffer length per expert actually allocated; a
  slot is kept when its rank in its expert is below min(C, rows). So with
  rows >= min(C, the largest expert load) (`moejax.moe.budgets.rows_needed`)
  the plan keeps exactly the slots that capacity C keeps, in buffers of `rows`.
  """
  num_tokens, top_k = expert_TK.shape
  rows = capacity if rows is None else min(rows, capacity)
  # Slot-major flattening: index m = k * T + t.
  expert_M = jnp.where(mask_TK, expert_TK, num_experts).T.reshape(-1)
  rank_M = _rank_within_group(expert_M, num_experts + 1)
  kept_M = (expert_M < num_experts) & (rank_M < rows)
  dropped_row = num_experts * rows
  slot_M = jnp.where(kept_M, expert_M * rows + rank_M, dropped_row)
  token_M = jnp.arange(top_k * num_tokens, dtype=jnp.int32) % num_tokens
  source_M = token_M * top_k + jnp.arange(top_k * num_tokens,
                                          dtype=jnp.int32) // num_tokens

  def buffer(values_M, empty):
    filled = jnp.full((dropped_row + 1,), empty, jnp.int32).at[slot_M].set(
        values_M)
    return filled[:dropped_row].reshape(num_experts, rows)

  return CapacityPlan(
      slot_TK=slot_M.reshape(top_k, num_tokens).T.astype(jnp.int32),
      kept_TK=kept_M.reshape(top_k, num_tokens).T,
      token_EC=buffer(token_M, num_tokens),
      source_EC=buffer(source_M, num_tokens * top_k))


def _combine_rows(y_RD: jax.Array, token_R: jax.Array, source_R: jax.Array,
                  w_TK: jax.Array) -> jax.Array:
  """Scatter-add of weighted rows into their tokens: [R, D] -> [T, D].

  Rows whose source is T * K (empty) read weight 0 and land on a spare row.
  """
  num_tokens = w_TK.shape[0]
  w_S = jnp.concatenate([w_TK.reshape(-1), jnp.zeros((1,), w_TK.dtype)])
  y_RD = y_RD * w_S[source_R][:, None]
  out_TD = jnp.zeros((num_tokens + 1, y_RD.shape[1]), y_RD.dtype)
  return out_TD.at[token_R].add(y_RD)[:num_tokens]


def dispatch_capacity(x_TD: jax.Array, plan: CapacityPlan) -> jax.Array:
  """Gathers tokens into expert buffers: [T, D] -> [E, C, D] (empty rows zero)."""
  x_padded = jnp.concatenate([x_TD, jnp.zeros_like(x_TD[:1])], axis=0)
  return x_padded[plan.token_EC]


def combine_capacity(y_ECD: jax.Array, plan: CapacityPlan,
                     weight_TK: jax.Array) -> jax.Array:
  """Weighted sum of each token's kept expert outputs: [E, C, D] -> [T, D]."""
  num_experts, rows, d = y_ECD.shape
  w_TK = jnp.where(plan.kept_TK, weight_TK, 0.0).astype(y_ECD.dtype)
  y_RD = y_ECD.reshape(num_experts * rows, d)
  if w_TK.size > num_experts * rows:  # Fewer buffer rows than slots: scatter.
    return _combine_rows(y_RD, plan.token_EC.reshape(-1),
                         plan.source_EC.reshape(-1), w_TK)
  y_rows = jnp.concatenate([y_RD, jnp.zeros((1, d), y_ECD.dtype)])
  return jnp.einsum("tkd,tk->td", y_rows[plan.slot_TK], w_TK)


@flax.struct.dataclass
class SortPlan:
  """Slots sorted by expert for a grouped matmul.

  Attributes:
    token_M: int32[M] token of each sorted row (unused slots sort last).
    inverse_TK: int32[T, K] sorted row of each slot; M for a slot past the M
      rows (never for a used slot when M >= the used slots).
    group_sizes_E: int32[E] rows per expert; rows past their sum are unused.
    source_M: int32[M] slot (t * K + k) of each sorted row.
  """

  token_M: jax.Array
  inverse_TK: jax.Array
  group_sizes_E: jax.Array
  source_M: jax.Array

  @property
  def kept_TK(self) -> jax.Array:
    """bool[T, K]: slots with a row (all used ones when M holds them)."""
    return self.inverse_TK < self.token_M.shape[0]


def plan_dropless(expert_TK: jax.Array, mask_TK: jax.Array, num_experts: int,
                  rows: int | None = None) -> SortPlan:
  """Sorts the T*K slots by expert (stable), unused slots after all experts.

  `rows` (default T*K) allocates M rows: with M >= the used slots
  (`moejax.moe.budgets.rows_needed`) every used slot has its row and the
  result is the same; of more used slots than M, some get no row
  (`SortPlan.kept_TK` says which). With M < T*K only the used slots are sorted
  (`_plan_used_slots`), so a small budget's plan costs a prefix sum over the
  T*K slots and a sort of M rows, not a sort of T*K.
  """
  num_tokens, top_k = expert_TK.shape
  num_slots = num_tokens * top_k
  rows = num_slots if rows is None else min(rows, num_slots)
  if rows < num_slots:
    return _plan_used_slots(expert_TK, mask_TK, num_experts, rows)
  expert_S = jnp.where(mask_TK, expert_TK, num_experts).reshape(-1)
  order_S = jnp.argsort(expert_S, stable=True)
  position_S = jnp.zeros_like(order_S).at[order_S].set(
      jnp.arange(num_slots, dtype=order_S.dtype))
  inverse_S = jnp.where(position_S < rows, position_S, rows)
  order_M = order_S[:rows]
  group_sizes_E = jnp.bincount(expert_S[order_M], length=num_experts + 1)[
      :num_experts]
  return SortPlan(
      token_M=(order_M // top_k).astype(jnp.int32),
      inverse_TK=inverse_S.reshape(num_tokens, top_k).astype(jnp.int32),
      group_sizes_E=group_sizes_E.astype(jnp.int32),
      source_M=order_M.astype(jnp.int32))


def _plan_used_slots(expert_TK: jax.Array, mask_TK: jax.Array,
                     num_experts: int, rows: int) -> SortPlan:
  """plan_dropless for M < T*K rows: the first M used slots (in slot order),
  sorted by expert (stable); rows past them are empty (token 0, source T*K,
  so they carry weight 0)."""
  num_tokens, top_k = expert_TK.shape
  num_slots = num_tokens * top_k
  used_S = mask_TK.reshape(-1)
  rank_S = jnp.cumsum(used_S, dtype=jnp.int32) - 1
  slot_M = jnp.full((rows + 1,), num_slots, jnp.int32).at[
      jnp.where(used_S & (rank_S < rows), rank_S, rows)].set(
          jnp.arange(num_slots, dtype=jnp.int32))[:rows]
  real_M = slot_M < num_slots
  expert_M = jnp.where(real_M, expert_TK.reshape(-1)[
      jnp.where(real_M, slot_M, 0)], num_experts)
  order_M = jnp.argsort(expert_M, stable=True)
  source_M = slot_M[order_M]
  inverse_S = jnp.full((num_slots + 1,), rows, jnp.int32).at[source_M].set(
      jnp.arange(rows, dtype=jnp.int32))[:num_slots]
  return SortPlan(
      token_M=jnp.where(source_M < num_slots, source_M // top_k, 0).astype(
          jnp.int32),
      inverse_TK=inverse_S.reshape(num_tokens, top_k),
      group_sizes_E=jnp.bincount(expert_M, length=num_experts + 1)[
          :num_experts].astype(jnp.int32),
      source_M=source_M)


def dispatch_sorted(x_TD: jax.Array, plan: SortPlan) -> jax.Array:
  """Gathers each slot's token in expert order: [T, D] -> [M, D]."""
  return x_TD[plan.token_M]


def combine_sorted(y_MD: jax.Array, plan: SortPlan, weight_TK: jax.Array,
                   mask_TK: jax.Array) -> jax.Array:
  """Weighted sum of each token's expert outputs: [M, D] -> [T, D]."""
  w_TK = jnp.where(mask_TK & plan.kept_TK, weight_TK, 0.0).astype(y_MD.dtype)
  if w_TK.size > y_MD.shape[0]:  # Fewer rows than slots: scatter-add the rows.
    return _combine_rows(y_MD, plan.token_M, plan.source_M, w_TK)
  # M = T*K here: every slot has a row.
  return jnp.einsum("tkd,tk->td", y_MD[plan.inverse_TK], w_TK)
