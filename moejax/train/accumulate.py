"""Gradient accumulation: k micro-batches per optimizer step, inside the one
jitted step (a `lax.scan`), for one optimizer update.

Shapes: B batch. The batch is k micro-batches (k = `train.grad_accum_steps`)
of B / k rows each.

The loss is the mean over the accumulated batch (the mean of the k
micro-batch losses, all of B / k rows), and so are the gradients and the reported
losses. Router statistics that must see the whole batch go through the
`batch_counts` collection (`moejax.routing.contract.BATCH_COUNTS`): each
micro-step reports its counts and is given those of the other micro-batches.

- State updates (the aux-loss-free bias, ReMoE's lambda) read the counts of
  the micro-batches before, plus their own: the last micro-step's update sees
  the whole batch, and only its router state is kept, so the state moves once
  per optimizer step, from the whole batch's counts.
- A loss over the whole batch (`global`: f_i counts every token of the
  accumulated batch, as Qiu et al. 2025 define the global batch) needs the
  counts in every micro-step, before its gradient: the step first runs a
  counts-only forward pass over the k micro-batches (no backward; XLA drops
  what the counts do not read, e.g. the blocks after the last MoE layer and
  the output logits), about one forward pass more per optimizer step.
- Per-micro-batch losses (`aux` per device group of a micro-batch, `sequence`
  per sequence, ReMoE's L1) are averaged over the micro-batches.

Router metrics are means over the micro-batches: whole-batch values for
means over tokens, per-micro-batch averages for maxima and percentiles.
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from moejax.routing.contract import BATCH_COUNTS, LOSS_COUNTS, ROUTER_STATE

Batch = dict[str, jax.Array]
# loss_fn(params, model_state, batch, rng, stage_step, mutable) ->
#   (loss, (ce, aux, updated collections)), as the train step's.
LossFn = Callable[..., tuple[jax.Array, tuple[jax.Array, dict, dict]]]
_AUX_KEYS = ("aux_loss", "layers", "loads")


def micro_batches(batch: Batch, k: int) -> Batch:
  """Leaves [B, ...] -> [k, B / k, ...]: micro-batch m holds rows m, m + k, ...

  Each device holds a contiguous block of B / n rows; with B / k divisible by n
  it holds the same B / (k n) rows of every micro-batch, so the split moves
  no data.
  """
  def split(a):
    return jnp.swapaxes(a.reshape(a.shape[0] // k, k, *a.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def needs_counts_pass(counts: Any) -> bool:
  """Whether a `batch_counts` tree holds a loss's counts (`LOSS_COUNTS`)."""
  return any(getattr(path[-1], "key", None) == LOSS_COUNTS
             for path, _ in jax.tree_util.tree_leaves_with_path(counts))


def _zeros(shapes):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _sum0(tree):
  return jax.tree.map(lambda a: jnp.sum(a, axis=0), tree)


def accumulated_grads(loss_fn: LossFn, k: int) -> Callable:
  """`(params, model_state, batch, rng, stage_step) -> (grads, (ce, aux,
  updated))`, as `jax.grad(loss_fn, has_aux=True)` on the whole batch with the
  `router_state` collection mutable, computed in k micro-steps; `aux` holds
  the mean `aux_loss`, `layers` and `loads`."""
  mutable = (ROUTER_STATE, BATCH_COUNTS)

  def grads_fn(params, model_state, batch: Batch, rng: jax.Array, stage_step):
    micro = micro_batches(batch, k)
    rngs = jax.random.split(rng, k)

    def forward(mb, micro_rng, counts, params=params):
      variables = {**model_state, BATCH_COUNTS: counts} if counts else model_state
      return loss_fn(params, variables, mb, micro_rng, stage_step, mutable)

    def own_counts(mb, micro_rng):
      return forward(mb, micro_rng, None)[1][2].get(BATCH_COUNTS, {})

    first = jax.tree.map(lambda a: a[0], micro)
    _, (ce_shape, aux_shape, updated_shape) = jax.eval_shape(
        forward, first, rngs[0], None)
    counts_shape = updated_shape.get(BATCH_COUNTS, {})
    state_shape = {c: v for c, v in updated_shape.items() if c != BATCH_COUNTS}
    others_k = None
    if needs_counts_pass(counts_shape):
      _, counts_k = jax.lax.scan(
          lambda carry, xs: (carry, own_counts(*xs)), None, (micro, rngs))
      total = _sum0(counts_k)
      others_k = jax.tree.map(lambda t, c: t[None] - c, total, counts_k)

    def micro_step(carry, xs):
      grad_sum, prior, _, sums = carry
      mb, micro_rng, others = xs
      grads, (ce, aux, updated) = jax.grad(
          lambda p: forward(mb, micro_rng, prior if others is None else others,
                            params=p), has_aux=True)(params)
      own = updated.get(BATCH_COUNTS, {})
      state = {c: v for c, v in updated.items() if c != BATCH_COUNTS}
      step_sums = (ce, {key: aux[key] for key in _AUX_KEYS})
      carry = (jax.tree.map(jnp.add, grad_sum, grads),
               jax.tree.map(jnp.add, prior, own), state,
               jax.tree.map(jnp.add, sums, step_sums))
      return carry, None

    aux_sums = {key: aux_shape[key] for key in _AUX_KEYS}
    init = (jax.tree.map(jnp.zeros_like, params), _zeros(counts_shape),
            _zeros(state_shape), _zeros((ce_shape, aux_sums)))
    (grad_sum, _, updated, (ce_sum, aux_sum)), _ = jax.lax.scan(
        micro_step, init, (micro, rngs, others_k))
    mean = functools.partial(jax.tree.map, lambda a: a / k)
    return mean(grad_sum), (mean(ce_sum), mean(aux_sum), updated)

  return grads_fn
