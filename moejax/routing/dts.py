"""EvoMoE's Dense-to-Sparse (DTS) gate: a Gumbel-softmax whose temperature anneals.

Shapes: T tokens, D model width, E experts (every expert is a slot: K = E).

Training: g = softmax((W h + zeta) / tau), zeta ~ Gumbel(0, 1); every expert with
g_i > threshold gets the token, weighted by g_i (or softmax(W h)_i), not
renormalised. As tau anneals from tau_max to tau_min fewer experts pass the
threshold: dense -> sparse. From `hard_step` on, each token goes to the argmax of
its Gumbel sample only (sampled top-1). Evaluation: deterministic top-1 of
softmax(W h). Balance loss of the Switch form on the used slots.
"""

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax.routing import losses
from moejax.routing.contract import Router, Routing

SCHEDULES = ("exponential", "linear")


def dts_temperature(step, *, tau_max: float, tau_min: float, anneal_steps: int,
                    schedule: str = "exponential") -> jax.Array:
  """tau at `step` (steps into the DTS stage).

  exponential: max(tau_max * (tau_min / tau_max) ** (step / anneal_steps), tau_min)
  linear:      max(tau_max - (tau_max - tau_min) * step / anneal_steps, tau_min)
  """
  frac = jnp.asarray(step, jnp.float32) / max(anneal_steps, 1)
  if schedule == "exponential":
    tau = tau_max * (tau_min / tau_max) ** frac
  elif schedule == "linear":
    tau = tau_max - (tau_max - tau_min) * frac
  else:
    raise ConfigError(f"router 'dts' schedule={schedule!r}; choose one of "
                      f"{', '.join(SCHEDULES)}")
  return jnp.maximum(tau, tau_min)


class DTSRouter(Router):
  """Dense-to-sparse Gumbel gate over all E experts.

  Attributes:
    tau_max: starting temperature (1.0 in the reference code).
    tau_min: final temperature (0.5 in the reference code).
    anneal_steps: steps from tau_max to tau_min.
    schedule: `exponential` or `linear` annealing.
    threshold: an expert is used when its gate exceeds this (0.001).
    hard_step: stage step from which routing is hard sampled top-1 (-1: never).
    combine: combine weights from the `gumbel` sample g or the `softmax` of W h.
    aux_loss_coef: weight of the Switch-form balance loss.
    z_loss_coef: weight of the router z-loss.
  """

  tau_max: float = 1.0
  tau_min: float = 0.5
  anneal_steps: int = 1000
  schedule: str = "exponential"
  threshold: float = 1e-3
  hard_step: int = -1
  combine: str = "gumbel"
  aux_loss_coef: float = 1e-2
  z_loss_coef: float = 0.0

  needs_step: ClassVar[bool] = True
  top1_only: ClassVar[bool] = True  # Evaluation is top-1; training uses the gate.


  @nn.compact
  def __call__(self, x_TD: jax.Array, *, token_ids_T: jax.Array | None = None,
               step: jax.Array | None = None,
               deterministic: bool = True) -> Routing:
    del token_ids_T
    if self.combine not in ("gumbel", "softmax"):
      raise ConfigError(f"router 'dts' combine={self.combine!r}; use gumbel or "
                        "softmax")
    num_tokens, num_experts = x_TD.shape[0], self.num_experts
    logits_TE = nn.Dense(
        num_experts, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
        name="gate", kernel_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("embed", None)))(
                x_TD.astype(jnp.float32))
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    if deterministic:
      mask_TE = jax.nn.one_hot(jnp.argmax(logits_TE, -1), num_experts) > 0
      weight_TE = probs_TE
      tau = jnp.asarray(self.tau_min, jnp.float32)
    else:
      if step is None:
        raise ConfigError("router 'dts' needs the training step; call the "
                          "model with step=")
      tau = dts_temperature(step, tau_max=self.tau_max, tau_min=self.tau_min,
                            anneal_steps=self.anneal_steps,
                            schedule=self.schedule)
      gumbel_TE = jax.random.gumbel(self.make_rng("router"), logits_TE.shape)
      sample_TE = jax.nn.softmax((logits_TE + gumbel_TE) / tau, axis=-1)
      hard_TE = jax.nn.one_hot(jnp.argmax(sample_TE, -1), num_experts) > 0
      hard = (step >= self.hard_step) if self.hard_step >= 0 else False
      mask_TE = jnp.where(hard, hard_TE, sample_TE > self.threshold)
      weight_TE = sample_TE if self.combine == "gumbel" else probs_TE
    expert_TE = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32),
                                 (num_tokens, num_experts))
    balance = losses.load_balancing_loss(probs_TE, expert_TE, mask_TE)
    z_loss = losses.router_z_loss(logits_TE)
    return Routing(
        expert_TK=expert_TE, weight_TK=weight_TE, mask_TK=mask_TE,
        aux_loss=self.aux_loss_coef * balance + self.z_loss_coef * z_loss,
        metrics={"balance_loss": balance, "z_loss": z_loss,
                 "entropy": losses.mean_entropy(probs_TE),
                 "temperature": tau,
                 "experts_per_token": jnp.mean(
                     jnp.sum(mask_TE.astype(jnp.float32), -1))})
