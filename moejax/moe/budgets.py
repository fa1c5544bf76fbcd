"""Slot budgets: a MoE layer pays for the routing slots a batch uses, not for all K.

The design (the budget ladders, fixed slots, exactness, the compile-time
price) is in docs/moe_layer.md, "Slot budgets"; this module implements it.

Shapes: T tokens (of one device inside the expert-parallel body), D model
width, F hidden width, E experts, K top-k slots per token, C capacity of one
expert for one device's tokens.

A pure wrapper over the routed FFN at one static size (`moejax.moe.routed`,
which knows the paths and the mesh): routers that use a variable number of
their K slots say so in their cost hint (`Slots.dense`), and `routed_ffn`
runs the smallest of a few static sizes that holds the batch
(`jax.lax.switch`), exactly.
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from moejax.moe.routed import RoutedFFN
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
  """Slots per token of the budgets for the slots after the dense ones
  (`Slots.dense`): 0, 1/32, 1/4, then powers of 2 below K, then K (K: the
  slots after them).

  Why these steps: docs/moe_layer.md, "Fixed slots stay outside the switch".
  """
  steps = {0.0, 1 / 32, 0.25} | {float(2**i) for i in range(top_k.bit_length())}
  return tuple(sorted(f for f in steps | {float(top_k)} if f <= top_k))


def budget_sizes(ffn: RoutedFFN, routing: Routing,
                 ladder: tuple[float, ...]) -> tuple[int, ...]:
  """Ascending static sizes of the budgets `ladder` (slots per token); the
  last one holds every slot (the K-slot program)."""
  return tuple(sorted({ffn.rows(routing, k) for k in ladder}))


def _switch_remat(index: jax.Array, branches: list[Callable[..., tuple]],
                  diff: tuple, fixed: tuple) -> tuple[jax.Array, jax.Array]:
  """jax.lax.switch(index, branches, *diff, *fixed) -> (y, kept) whose
  gradient recomputes the taken branch.

  Differentiating a plain switch makes its forward pass return the residuals of
  every branch (zeros for those not taken), and the largest branch's are K
  times the smallest's: writing them cost more than the branch itself. Here
  the forward pass keeps only the operands and the backward pass runs the
  taken branch's forward and VJP: the extra cost is one forward of that
  branch. Gradients flow from y to `diff` (float arrays) only.
  """

  @jax.custom_vjp
  def run(index, diff, fixed):
    return jax.lax.switch(index, branches, *diff, *fixed)

  def fwd(index, diff, fixed):
    return run(index, diff, fixed), (index, diff, fixed)

  def bwd(saved, ct):
    index, diff, fixed = saved

    def vjp_of(branch):
      def grads(diff, fixed, ct_y):
        _, vjp = jax.vjp(lambda *d: branch(*d, *fixed)[0], *diff)
        return vjp(ct_y)
      return grads

    grads = jax.lax.switch(index, [vjp_of(b) for b in branches], diff, fixed,
                           ct[0])
    return None, tuple(grads), None

  run.defvjp(fwd, bwd)
  return run(index, diff, fixed)


def routed_ffn(ffn: RoutedFFN, x_TD: jax.Array, routing: Routing,
               w_in_EDF: jax.Array, w_out_EFD: jax.Array, *,
               budgets: bool = True) -> tuple[jax.Array, jax.Array]:
  """`ffn` (dispatch -> experts -> combine) of T routed tokens at the smallest
  budget that holds the batch: (y [T, D], kept bool[T, K]), `kept` from the
  program that ran.

  Routings whose slots are all dense (`Slots.dense` None) run at one static
  size; `budgets=False` always pays for all K slots (the reference the tests
  compare with).
  """
  top_k = routing.expert_TK.shape[1]
  if not budgets or not routing.slots.sparse(top_k):
    return ffn(ffn.full_rows(routing), x_TD, routing, w_in_EDF, w_out_EFD)
  dense = routing.slots.dense
  if dense and ffn.independent_slots:
    # The dense slots and the others are two independent sums: the dense ones
    # at a static size, outside the switch.
    head, rest = (_slots(routing, s) for s in (slice(0, dense),
                                               slice(dense, None)))
    y_TD, kept_head = ffn(ffn.full_rows(head), x_TD, head, w_in_EDF, w_out_EFD)
    y_rest, kept_rest = _budgeted(ffn, tail_ladder(top_k - dense), x_TD, rest,
                                  w_in_EDF, w_out_EFD)
    return (y_TD + y_rest.astype(y_TD.dtype),
            jnp.concatenate([kept_head, kept_rest], axis=1))
  ladder = tuple(k for k in slot_ladder(top_k) if k >= dense)
  return _budgeted(ffn, ladder, x_TD, routing, w_in_EDF, w_out_EFD)


def _with_slots(routing: Routing, expert_TK, weight_TK, mask_TK) -> Routing:
  """`routing` with other slots, no aux loss and no metrics."""
  return routing.replace(expert_TK=expert_TK, weight_TK=weight_TK,
                         mask_TK=mask_TK, aux_loss=jnp.zeros(()), metrics={})


def _slots(routing: Routing, which: slice) -> Routing:
  """The routing of some of the K slots."""
  return _with_slots(routing, routing.expert_TK[:, which],
                     routing.weight_TK[:, which], routing.mask_TK[:, which])


def _budgeted(ffn: RoutedFFN, ladder: tuple[float, ...], x_TD, routing,
              w_in_EDF, w_out_EFD) -> tuple[jax.Array, jax.Array]:
  """(y [T, D], kept [T, K]) of `ffn` at the smallest budget of `ladder` that
  holds the batch; size 0 (no slot used) is a branch that returns zeros."""
  sizes = budget_sizes(ffn, routing, ladder)
  if len(sizes) == 1:
    return ffn(sizes[0], x_TD, routing, w_in_EDF, w_out_EFD)
  index = jnp.sum(jnp.asarray(sizes[:-1], jnp.int32) < ffn.rows_needed(routing))
  capacity = ffn.capacity(routing)

  def branch(size, x_TD, weight_TK, w_in_EDF, w_out_EFD, expert_TK, mask_TK):
    r = _with_slots(routing, expert_TK, weight_TK, mask_TK)
    return ffn(size, x_TD, r, w_in_EDF, w_out_EFD, capacity=capacity)

  branches = [functools.partial(branch, size) for size in sizes if size]
  diff = (x_TD, routing.weight_TK, w_in_EDF, w_out_EFD)
  ints = (routing.expert_TK, routing.mask_TK)
  if 0 in sizes:
    y, kept = jax.eval_shape(branches[0], *diff, *ints)
    branches.insert(0, lambda *_: (jnp.zeros(y.shape, y.dtype),
                                   jnp.zeros(kept.shape, kept.dtype)))
  return _switch_remat(index, branches, diff, ints)
