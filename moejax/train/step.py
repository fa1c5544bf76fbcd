"""The pure train and eval steps: `(state, batch) -> (state, metrics)`.

Shapes: B batch, L length, V vocabulary, E experts.
"""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from moejax.models import losses
from moejax.routing.contract import ROUTER_STATE
from moejax.train.accumulate import accumulated_grads
from moejax.train.inputs import apply_model
from moejax.train.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def token_weights(batch: Batch) -> Batch:
  """A batch with weights (`weights` [B, L]: 1 at the positions scored, as a
  masked-LM or seq2seq batch has) with them scaled by B * L / their sum, so
  that the mean of ce * weights over any equal split of the rows
  (`moejax.train.accumulate`'s micro-batches) averages to the whole batch's
  weighted mean. Other batches unchanged."""
  if "weights" not in batch:
    return batch
  w_BL = batch["weights"].astype(jnp.float32)
  return {**batch, "weights": w_BL * (w_BL.size / jnp.maximum(jnp.sum(w_BL), 1))}


def mean_loss(logits_BLV: jax.Array, batch: Batch,
              label_smoothing: float = 0.0) -> jax.Array:
  """float32[]: the mean cross-entropy of the batch's scored tokens (every
  token, or those `token_weights` weighs)."""
  ce_BL = losses.token_cross_entropy(logits_BLV, batch["targets"],
                                     label_smoothing)
  if "weights" not in batch:
    return jnp.mean(ce_BL)
  return jnp.mean(ce_BL * batch["weights"])


def loss_sums(logits_BLV: jax.Array, batch: Batch) -> Metrics:
  """{"loss_sum", "correct", "tokens"} of the batch's scored tokens
  (`moejax.models.losses.loss_sums`; weights 1 where the batch scores)."""
  return losses.loss_sums(logits_BLV, batch["targets"], batch.get("weights"))


def router_metrics(layers: dict[str, dict[str, jax.Array]]) -> Metrics:
  """Flat `router/<layer>/<name>` scalars plus their mean over MoE layers."""
  out = {}
  for layer, metrics in layers.items():
    for name, value in metrics.items():
      out[f"router/{layer}/{name}"] = value
  names = sorted({n for m in layers.values() for n in m})
  for name in names:
    values = [m[name] for m in layers.values() if name in m]
    out[f"router/{name}"] = jnp.mean(jnp.stack(values))
  return out


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    rng: jax.Array, *, stage_start: int = 0,
                    grad_accum_steps: int = 1, label_smoothing: float = 0.0
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """Builds the step: loss = mean CE + sum of router aux losses; one update.
  A batch with `weights` (masked LM, seq2seq: `moejax.train.inputs`) has the
  mean CE over its scored positions. `label_smoothing` eps > 0 trains against
  targets smoothed by eps (`train/loss` is then the smoothed CE; evaluation
  always reports the plain one).

  With `grad_accum_steps` k > 1 the batch is k micro-batches whose gradients
  are accumulated in the step (`moejax.train.accumulate`, which says what each
  balance policy does), still one update; losses and gradients are means over
  the whole batch. k = 1 is the plain step.

  Metrics are float32[] scalars, except `router/<layer>/load`: float32[E], the
  share of routed slots per expert.

  The step's randomness is `fold_in(rng, state.step)`, so a resumed run draws the
  same numbers as an uninterrupted one. Routers with schedules see the steps
  taken since `stage_start`. Non-gradient router state (the `router_state`
  collection: expert biases, ReMoE's L1 coefficient) is updated by the forward
  pass from this step's batch and kept in `state.model_state`.
  """

  def loss_fn(params, model_state, batch, step_rng, stage_step,
              mutable=(ROUTER_STATE,)):
    (logits_BLV, aux), updated = apply_model(
        model, {"params": params, **model_state}, batch, deterministic=False,
        step=stage_step, rngs={"router": step_rng}, mutable=list(mutable))
    ce = mean_loss(logits_BLV, batch, label_smoothing)
    return ce + aux["aux_loss"], (ce, aux, updated)

  if grad_accum_steps > 1:
    grads_fn = accumulated_grads(loss_fn, grad_accum_steps)
  else:
    grads_fn = jax.grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    step_rng = jax.random.fold_in(rng, state.step)
    grads, (ce, aux, updated) = grads_fn(
        state.params, state.model_state, token_weights(batch), step_rng,
        state.step - stage_start)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "train/loss": ce,
        "train/aux_loss": aux["aux_loss"],
        "train/total_loss": ce + aux["aux_loss"],
        "train/grad_norm": optax.global_norm(grads),
        "train/param_norm": optax.global_norm(params),
        **router_metrics(aux["layers"]),
        **{f"router/{layer}/load": load_E
           for layer, load_E in aux["loads"].items()},
    }
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state,
                              model_state={**state.model_state, **updated})
    return new_state, metrics

  return train_step


def make_probe_step(model: nn.Module) -> Callable[[dict, Batch], dict]:
  """Builds `(variables, batch) -> {"routes": {layer: int32[B*L] top expert},
  "trace": {layer: {"expert", "weight", "mask"}}, "loss": float32[]}`
  (deterministic routing, as at evaluation). Variables holding a `replay`
  collection (`moejax.routing.replay.replay_variables`) force recorded routes."""

  def probe_step(variables, batch: Batch):
    logits_BLV, aux = apply_model(model, variables, batch, deterministic=True)
    return {"routes": aux["routes"], "trace": aux["trace"],
            "loss": mean_loss(logits_BLV, token_weights(batch))}

  return probe_step


def make_eval_step(model: nn.Module) -> Callable[[dict, Batch], Metrics]:
  """Builds `(variables, batch) -> {"loss_sum", "correct", "tokens"}`,
  deterministic routing."""

  def eval_step(variables, batch: Batch) -> Metrics:
    logits_BLV, _ = apply_model(model, variables, batch, deterministic=True)
    return loss_sums(logits_BLV, batch)

  return eval_step
