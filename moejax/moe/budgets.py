"""Slot budgets: a MoE layer pays for the routing slots a batch uses, not for all K.

The design (the budget ladders, fixed slots, exactness, the compile-time
price) is in docs/moe_layer.md, "Slot budgets"; this module implements it.

Shapes: T tokens, S tokens of one device (S = T without a mesh), D model
width, F hidden width, E experts, K slots per token, C capacity of one expert
for one device's tokens.
"""

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax.moe import dispatch
from moejax.moe.experts import capacity_ffn, grouped_ffn
from moejax.parallel import expert_parallel
from moejax.routing.contract import Routing


def slot_ladder(top_k: int) -> tuple[float, ...]:
  """Slots per token of the budgets: 1, 1.125, 1.25, then powers of 2 below
  K, then K.

  Why these steps: docs/moe_layer.md, "Slot budgets".
  """
  steps = {1.0, 1.125, 1.25} | {float(2**i)
                                for i in range(1, max(1, top_k).bit_length())}
  return tuple(sorted(f for f in steps | {float(top_k)} if f <= top_k))


def tail_ladder(top_k: int) -> tuple[float, ...]:
  """Slots per token of the budgets for the slots after `Routing.fixed_slots`:
  0, 1/32, 1/4, then powers of 2 below K, then K (K: the slots after them).

  Why these steps: docs/moe_layer.md, "Fixed slots stay outside the switch".
  """
  steps = {0.0, 1 / 32, 0.25} | {float(2**i) for i in range(top_k.bit_length())}
  return tuple(sorted(f for f in steps | {float(top_k)} if f <= top_k))


def budget_sizes(path: str, *, tokens: int, top_k: int, capacity: int,
                 sparse: bool, tail: bool = False) -> tuple[int, ...]:
  """Ascending static sizes; the last one holds every slot (the K-slot program).

  dropless: sorted rows ceil(S * k); capacity: rows per expert ceil(C * k / K).
  `tail`: the budgets of the slots after the fixed ones (`tail_ladder`,
  dropless only), which start at 0 rows.
  """
  if tail:
    ladder = tail_ladder(top_k)
  else:
    ladder = slot_ladder(top_k) if sparse else (float(top_k),)
  if path == "dropless":
    sizes = [min(tokens * top_k, math.ceil(tokens * k)) for k in ladder]
  else:
    sizes = [min(capacity, math.ceil(capacity * k / top_k)) for k in ladder]
  return tuple(sorted(set(sizes)))


def rows_needed(expert_TK: jax.Array, mask_TK: jax.Array, *, path: str,
                num_experts: int, capacity: int, shards: int) -> jax.Array:
  """int32[]: the size a batch needs, the largest over the `shards` devices
  that split its tokens (contiguous blocks of S tokens)."""
  mask_NR = mask_TK.reshape(shards, -1)
  if path == "dropless":
    return jnp.max(jnp.sum(mask_NR, axis=1, dtype=jnp.int32))
  expert_NR = jnp.where(mask_NR, expert_TK.reshape(shards, -1), num_experts)
  load_NE = jax.vmap(lambda e: jnp.bincount(e, length=num_experts + 1))(
      expert_NR)[:, :num_experts]
  return jnp.minimum(jnp.max(load_NE), capacity).astype(jnp.int32)


def _local_ffn(size, x_TD, routing, w_in_EDF, w_out_EFD, *, path, capacity,
               activation, ragged_dot):
  """The one-device program at `size` rows: (y [T, D], kept bool[T, K])."""
  num_experts = w_in_EDF.shape[0]
  if path == "capacity":
    plan = dispatch.plan_capacity(routing.expert_TK, routing.mask_TK,
                                  num_experts, capacity, size)
    y_ECD = capacity_ffn(dispatch.dispatch_capacity(x_TD, plan), w_in_EDF,
                         w_out_EFD, activation)
    return dispatch.combine_capacity(y_ECD, plan, routing.weight_TK), plan.kept_TK
  plan = dispatch.plan_dropless(routing.expert_TK, routing.mask_TK, num_experts,
                                size)
  y_MD = grouped_ffn(dispatch.dispatch_sorted(x_TD, plan), w_in_EDF, w_out_EFD,
                     plan.group_sizes_E, activation, ragged_dot)
  y_TD = dispatch.combine_sorted(y_MD, plan, routing.weight_TK, routing.mask_TK)
  return y_TD, routing.mask_TK & plan.kept_TK


def _switch_remat(index: jax.Array, branches: list[Callable[..., jax.Array]],
                  diff: tuple, fixed: tuple) -> jax.Array:
  """jax.lax.switch(index, branches, *diff, *fixed) whose gradient recomputes
  the taken branch.

  Differentiating a plain switch makes its forward pass return the residuals of
  every branch (zeros for those not taken), and the largest branch's are K
  times the smallest's: writing them cost more than the branch itself. Here
  the forward pass keeps only the operands and the backward pass runs the
  taken branch's forward and VJP: the extra cost is one forward of that
  branch. Gradients flow to `diff` (float arrays) only.
  """

  @jax.custom_vjp
  def run(index, diff, fixed):
    return jax.lax.switch(index, branches, *diff, *fixed)

  def fwd(index, diff, fixed):
    return run(index, diff, fixed), (index, diff, fixed)

  def bwd(saved, ct):
    index, diff, fixed = saved

    def vjp_of(branch):
      def grads(diff, fixed, ct):
        _, vjp = jax.vjp(lambda *d: branch(*d, *fixed), *diff)
        return vjp(ct)
      return grads

    grads = jax.lax.switch(index, [vjp_of(b) for b in branches], diff, fixed,
                           ct)
    return None, tuple(grads), None

  run.defvjp(fwd, bwd)
  return run(index, diff, fixed)


def _kept(routing: Routing, *, path: str, num_experts: int, capacity: int,
          shards: int) -> jax.Array:
  """bool[T, K]: the slots the K-slot program keeps (every budget that holds
  the batch keeps the same), per device when `shards` > 1."""
  if path == "dropless":
    return routing.mask_TK
  expert_NSK = routing.expert_TK.reshape(shards, -1, routing.expert_TK.shape[1])
  mask_NSK = routing.mask_TK.reshape(expert_NSK.shape)
  kept_NSK = jax.vmap(lambda e, m: dispatch.plan_capacity(
      e, m, num_experts, capacity).kept_TK)(expert_NSK, mask_NSK)
  return kept_NSK.reshape(routing.mask_TK.shape)


def routed_ffn(x_TD: jax.Array, routing: Routing, w_in_EDF: jax.Array,
               w_out_EFD: jax.Array, *, dispatch_path: str = "capacity",
               capacity_factor: float = 1.25,
               activation: Callable[[jax.Array], jax.Array] = nn.gelu,
               ragged_dot: Callable[..., jax.Array] = jax.lax.ragged_dot,
               mesh: jax.sharding.Mesh | None = None,
               budgets: bool = True) -> tuple[jax.Array, jax.Array]:
  """dispatch -> expert FFNs -> combine of T routed tokens: (y [T, D], kept [T, K]).

  On one device the plan is global; with a `mesh` it runs expert-parallel
  (`moejax.parallel.expert_parallel_ffn`). When `routing.sparse_slots` (and
  `budgets`) it runs at the smallest budget that holds the batch (module
  docstring); `budgets=False` always pays for all K slots (the reference the
  tests compare with).
  """
  if dispatch_path not in dispatch.DISPATCH_PATHS:
    raise ConfigError(f"unknown dispatch {dispatch_path!r}; valid: "
                      f"{', '.join(dispatch.DISPATCH_PATHS)}")
  num_tokens = x_TD.shape[0]
  num_experts = w_in_EDF.shape[0]
  top_k = routing.expert_TK.shape[1]
  if mesh is None:
    shards, tokens = 1, num_tokens
    capacity = routing.capacity or dispatch.expert_capacity(
        num_tokens, num_experts, top_k, capacity_factor)
    run = functools.partial(_local_ffn, path=dispatch_path, capacity=capacity,
                            activation=activation, ragged_dot=ragged_dot)
  else:
    _, shards = expert_parallel.check_mesh(mesh, num_tokens, num_experts)
    tokens = num_tokens // shards
    capacity = expert_parallel.local_capacity(
        tokens, num_experts, top_k, capacity_factor, routing.capacity)

    def run(size, x_TD, routing, w_in_EDF, w_out_EFD):
      return expert_parallel.expert_parallel_ffn(
          x_TD, routing, w_in_EDF, w_out_EFD, mesh=mesh,
          dispatch_path=dispatch_path, capacity_factor=capacity_factor,
          activation=activation, ragged_dot=ragged_dot, rows=size)

  sparse = budgets and routing.sparse_slots
  fixed = routing.fixed_slots if sparse and dispatch_path == "dropless" else 0
  if 0 < fixed < top_k:
    # Dropless drops nothing, so the fixed slots and the others are two
    # independent sums: the fixed ones at a static size, outside the switch.
    head, rest = (_slots(routing, s) for s in (slice(0, fixed),
                                               slice(fixed, None)))
    y_TD, _ = run(tokens * fixed, x_TD, head, w_in_EDF, w_out_EFD)
    sizes = budget_sizes(dispatch_path, tokens=tokens, top_k=top_k - fixed,
                         capacity=capacity, sparse=True, tail=True)
    y_TD = y_TD + _budgeted(run, sizes, x_TD, rest, w_in_EDF, w_out_EFD,
                            path=dispatch_path, capacity=capacity,
                            shards=shards).astype(y_TD.dtype)
    return y_TD, routing.mask_TK
  sizes = budget_sizes(dispatch_path, tokens=tokens, top_k=top_k,
                       capacity=capacity, sparse=sparse)
  if len(sizes) == 1:
    return run(sizes[0], x_TD, routing, w_in_EDF, w_out_EFD)
  y_TD = _budgeted(run, sizes, x_TD, routing, w_in_EDF, w_out_EFD,
                   path=dispatch_path, capacity=capacity, shards=shards)
  return y_TD, _kept(routing, path=dispatch_path, num_experts=num_experts,
                     capacity=capacity, shards=shards)


def _with_slots(routing: Routing, expert_TK, weight_TK, mask_TK) -> Routing:
  """`routing` with other slots, no aux loss, no metrics, no fixed slots."""
  return routing.replace(expert_TK=expert_TK, weight_TK=weight_TK,
                         mask_TK=mask_TK, aux_loss=jnp.zeros(()), metrics={},
                         fixed_slots=0)


def _slots(routing: Routing, which: slice) -> Routing:
  """The routing of some of the K slots."""
  return _with_slots(routing, routing.expert_TK[:, which],
                     routing.weight_TK[:, which], routing.mask_TK[:, which])


def _budgeted(run, sizes, x_TD, routing, w_in_EDF, w_out_EFD, *, path,
              capacity, shards) -> jax.Array:
  """y [T, D] of `run` at the smallest of `sizes` that holds the batch; size 0
  (no slot used) is a branch that returns zeros."""
  num_experts = w_in_EDF.shape[0]
  need = rows_needed(routing.expert_TK, routing.mask_TK, path=path,
                     num_experts=num_experts, capacity=capacity, shards=shards)
  index = jnp.sum(jnp.asarray(sizes[:-1], jnp.int32) < need)

  def branch(size, x_TD, weight_TK, w_in_EDF, w_out_EFD, expert_TK, mask_TK):
    r = _with_slots(routing, expert_TK, weight_TK, mask_TK)
    return run(size, x_TD, r, w_in_EDF, w_out_EFD)[0]

  branches = [functools.partial(branch, size) for size in sizes if size]
  diff = (x_TD, routing.weight_TK, w_in_EDF, w_out_EFD)
  ints = (routing.expert_TK, routing.mask_TK)
  if 0 in sizes:
    out = jax.eval_shape(branches[0], *diff, *ints)
    branches.insert(0, lambda *_: jnp.zeros(out.shape, out.dtype))
  return _switch_remat(index, branches, diff, ints)
