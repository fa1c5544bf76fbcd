"""Slot budgets: a MoE layer pays for the routing slots a batch uses, not for all K.

Shapes: T tokens, S tokens of one device (S = T without a mesh), D model
width, E experts, K slots per token, C capacity of one expert for one
device's tokens.

A pure wrapper over the routed FFN at one static size (`moejax.moe.routed`,
which knows the paths and the mesh). Routers with a variable number of
experts per token (the DTS gate, DSelect-k, expert choice, ReLU gates) emit
K = E slots and a mask, and say so in their cost hint (`Slots.dense`).
Paying for all K slots makes their step E times the cost of their sparsity. Instead, dispatch -> experts -> combine is compiled at
a few static sizes, for k = 1, 1.125, 1.25, 2, 4, ... slots per token up to
K, and `jax.lax.switch` runs the smallest one that holds what the batch uses:

- dropless: sorted rows per device, S * k; a batch needs the most used slots
  of any device;
- capacity: buffer rows per expert per device, ceil(C * k / K); a batch needs
  min(C, the largest load of any expert on any device).

A router whose first f slots are used by (nearly) every token sets
`Slots.dense = f` (DSelect-k: its k heaviest experts): no budget below f
slots per token is compiled. Where slots are independent sums (the dropless
path, which drops nothing), the layer's output is then the sum of two
independent programs: the dense slots at their static size S * f, outside any
conditional, and the other K - f slots through the switch over budgets of
0, 1/32, 1/4, 1, 2, ... slots per token (`tail_ladder`), whose size 0 returns
zeros. So once a router is as sparse as its dense slots it pays one static
program and an empty branch, and the few tokens not yet there cost a small
budget, not a switch that holds the whole layer.

Exact by construction: a size that holds every used (capacity: every kept)
slot computes the same sums as the K-slot program, so values and gradients
are equal (tested against the K-slot program and the naive loop, on both paths
and expert-parallel). Shapes stay static; only the taken branch runs, forward
and backward (its forward twice: the backward pass recomputes it rather than
store every branch's residuals, see `_switch_remat`). Every size is compiled,
so compile time grows with the number of sizes (at most log2(K) + 3).
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

  1.125 and 1.25 are for routers that hover about one expert per token (ReMoE
  at its target sparsity: 0.96-1.12 per layer in the routers benchmark):
  without them a batch just over one slot per token would pay for two.
  """
  steps = {1.0, 1.125, 1.25} | {float(2**i)
                                for i in range(1, max(1, top_k).bit_length())}
  return tuple(sorted(f for f in steps | {float(top_k)} if f <= top_k))


def tail_ladder(top_k: int) -> tuple[float, ...]:
  """Slots per token of the budgets for the slots after the dense ones
  (`Slots.dense`): 0, 1/32, 1/4, then powers of 2 below K, then K (K: the
  slots after them).

  0 costs nothing (the batch uses the dense slots only); 1/32 and 1/4 are for
  a few tokens whose extra experts are not yet switched off.
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
