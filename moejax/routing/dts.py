"""EvoMoE's Dense-to-Sparse (DTS) gate: a Gumbel-softmax whose temperature anneals.

Shapes: T tokens, D model width, E experts, K top-k routing slots (E, or the
cap `max_experts`).

Training: g = softmax((W h + zeta) / tau), zeta ~ Gumbel(0, 1); every expert with
g_i > threshold gets the token (at most `max_experts` of them, the largest g),
not renormalised. As tau anneals from tau_max to tau_min fewer experts pass the
threshold: dense -> sparse. From `hard_step` on, each token goes to the argmax of
its Gumbel sample only (sampled top-1). Evaluation: top-1.

Slots follow the sparsity: the soft phase has K = E slots (or the cap) with a
mask, and the MoE layer pays for the slots a batch uses (`moejax.moe.budgets`);
evaluation, and a hard phase known at trace time (`hard_step` <= 0), have one
slot per token, the cost of Switch. The stage machine makes the hard phase a
segment of its stage compiled as such a program (`DTSRouter.phases`,
`moejax.stages.plan`): from `hard_step` on, `hard_step` = -1 routes exactly
alike.

One combine weight in training and evaluation (`combine`, the reference's two
options): `softmax` (its default) weighs a used expert by softmax(W h)_i in both
and evaluates top-1 of softmax(W h); `gumbel` weighs it by g_i in both and
evaluates top-1 of a Gumbel-softmax sample (the step's temperature when the
caller passes `step`, else tau_min). Balance loss: the reference's
E^2 * mean_i(me_i * ce_i) over the masked combine weights (`balance`), or the
Switch form.
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax.routing import losses
from moejax.routing.contract import Router, Routing, Slots, TokenLayout

SCHEDULES = ("exponential", "linear")
COMBINES = ("softmax", "gumbel")
BALANCES = ("reference", "switch")
# Evaluation with combine="gumbel" and no `router` rng draws its noise from this
# key: evaluation stays deterministic (the same PPL for the same params).
_EVAL_KEY = 0


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


def reference_balance_loss(gates_TE: jax.Array, mask_TE: jax.Array) -> jax.Array:
  """EvoMoE's balance loss E^2 * mean_i(me_i * ce_i).

  me_i: mean over tokens of the masked combine gate of expert i (the gradient
  flows here); ce_i: share of tokens using expert i (counted; sums to the
  experts per token). Uniform routing of k experts per token gives about k * g
  where g is the mean gate of a used slot.
  """
  num_experts = gates_TE.shape[-1]
  me_E = jnp.mean(jnp.where(mask_TE, gates_TE, 0.0), axis=0)
  ce_E = jnp.mean(mask_TE.astype(jnp.float32), axis=0)
  return num_experts**2 * jnp.mean(me_E * ce_E)


class DTSRouter(Router):
  """Dense-to-sparse Gumbel gate over all E experts.

  Attributes:
    tau_max: starting temperature (1.0 in the reference code).
    tau_min: final temperature (0.5 in the reference code).
    anneal_steps: steps from tau_max to tau_min.
    schedule: `exponential` or `linear` annealing.
    threshold: an expert is used when its gate exceeds this (0.001).
    hard_step: stage step from which routing is sampled top-1, as the
      reference's switch step: -1 (or any value <= 0) is sampled top-1 from
      the first step, with one slot per token; None: never (soft throughout).
    combine: `softmax` (the reference's default) or `gumbel`: the combine
      weight in training and evaluation alike (module docstring).
    max_experts: most experts per token in the soft phase, the largest gates
      above the threshold (0: all E, the reference); the soft phase's cost.
    balance: `reference` (E^2 mean_i me_i ce_i over the masked combine gates)
      or `switch` (E sum_i f_i P_i over the unmasked softmax).
    aux_loss_coef: weight of the balance loss per MoE layer (moejax sums the
      layers' aux losses). The authors' balanced script uses 0.01 per layer,
      summed (`--moe-gate-loss-wt 0.01 --moe-gate-loss-combine-method sum`),
      their other DTS scripts no gate loss (0); fairseq's class default 1.0
      is used by none of their commands. The evomoe preset uses 0.01.
    z_loss_coef: weight of the router z-loss.
  """

  tau_max: float = 1.0
  tau_min: float = 0.5
  anneal_steps: int = 1000
  schedule: str = "exponential"
  threshold: float = 1e-3
  hard_step: int | None = None
  combine: str = "softmax"
  max_experts: int = 0
  balance: str = "reference"
  aux_loss_coef: float = 1.0
  z_loss_coef: float = 0.0

  top1_only: ClassVar[bool] = True  # Evaluation is top-1; training uses the gate.

  @classmethod
  def check_options(cls, options: dict[str, Any], *, num_experts: int,
                    top_k: int) -> None:
    super().check_options(options, num_experts=num_experts, top_k=top_k)
    for name, valid in (("combine", COMBINES), ("balance", BALANCES),
                        ("schedule", SCHEDULES)):
      if options[name] not in valid:
        raise ConfigError(f"router 'dts' {name}={options[name]!r}; choose one "
                          f"of {', '.join(valid)}")
    hard_step = options["hard_step"]
    if hard_step is not None and not isinstance(hard_step, int):
      raise ConfigError(f"router 'dts' hard_step={hard_step!r}; use a stage "
                        "step (-1: sampled top-1 from the start) or None (never)")
    if options["max_experts"] < 0:
      raise ConfigError(f"router 'dts' max_experts={options['max_experts']} "
                        "must be >= 0 (0: every expert above the threshold)")

  @classmethod
  def phases(cls, options: dict[str, Any], stage_steps: int
             ) -> tuple[tuple[int, dict[str, Any]], ...]:
    """Soft, then hard: from `hard_step` on, `step >= hard_step` holds at every
    step, so `hard_step=-1` routes alike, with one slot per token, not E."""
    hard_step = options.get("hard_step")
    if hard_step is None or hard_step <= 0 or hard_step >= stage_steps:
      return ((0, {}),)
    return ((0, {}), (hard_step, {"hard_step": -1}))

  @property
  def one_slot_in_training(self) -> bool:
    """Whether training is sampled top-1 at every step (static: one slot)."""
    return self.hard_step is not None and self.hard_step <= 0

  def _noise(self, shape, deterministic: bool) -> jax.Array:
    if not deterministic or self.has_rng("router"):
      return jax.random.gumbel(self.make_rng("router"), shape)
    return jax.random.gumbel(jax.random.key(_EVAL_KEY), shape)

  @nn.compact
  def __call__(self, x_TD: jax.Array, *, token_ids_T: jax.Array | None = None,
               step: jax.Array | None = None,
               layout: TokenLayout | None = None,
               deterministic: bool = True) -> Routing:
    del token_ids_T, layout
    num_experts = self.num_experts
    logits_TE = nn.Dense(
        num_experts, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
        name="gate", kernel_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("embed", None)))(
                x_TD.astype(jnp.float32))
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    if step is None and not deterministic:
      raise ConfigError("router 'dts' needs the training step; call the "
                        "model with step=")
    if step is None:
      tau = jnp.asarray(self.tau_min, jnp.float32)
    else:
      tau = dts_temperature(step, tau_max=self.tau_max, tau_min=self.tau_min,
                            anneal_steps=self.anneal_steps,
                            schedule=self.schedule)
    use_sample = self.combine == "gumbel" or not deterministic
    if use_sample:
      sample_TE = jax.nn.softmax(
          (logits_TE + self._noise(logits_TE.shape, deterministic)) / tau, -1)
    weight_TE = sample_TE if self.combine == "gumbel" else probs_TE
    choice_T = jnp.argmax(sample_TE if use_sample else logits_TE, -1)
    top1_TE = jax.nn.one_hot(choice_T, num_experts) > 0
    cap = min(self.max_experts or num_experts, num_experts)
    one_slot = deterministic or self.one_slot_in_training
    if one_slot:
      mask_TE = top1_TE
    else:
      soft_TE = sample_TE > self.threshold
      if cap < num_experts:  # Only the `cap` largest samples may be used.
        kth_T = jax.lax.top_k(sample_TE, cap)[0][:, -1]
        soft_TE = soft_TE & (sample_TE >= kth_T[:, None])
      hard = False if self.hard_step is None else step >= self.hard_step
      mask_TE = jnp.where(hard, top1_TE, soft_TE)
    if self.balance == "reference":
      balance = reference_balance_loss(weight_TE, mask_TE)
    else:
      balance = losses.load_balancing_loss(
          probs_TE, jnp.broadcast_to(jnp.arange(num_experts), mask_TE.shape),
          mask_TE)
    z_loss = losses.router_z_loss(logits_TE)
    # Slots: the chosen expert alone (one slot); expert e in slot e; or the
    # `cap` largest samples (used ones first).
    rank_TE = sample_TE if use_sample else probs_TE
    if one_slot:
      expert_TK = choice_T[:, None].astype(jnp.int32)
    elif cap < num_experts:
      expert_TK = jax.lax.top_k(rank_TE, cap)[1].astype(jnp.int32)
    else:
      expert_TK = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32),
                                   mask_TE.shape)
    take = lambda a_TE: jnp.take_along_axis(a_TE, expert_TK, axis=1)  # noqa: E731
    return Routing(
        expert_TK=expert_TK, weight_TK=take(weight_TE), mask_TK=take(mask_TE),
        aux_loss=self.aux_loss_coef * balance + self.z_loss_coef * z_loss,
        metrics={"balance_loss": balance, "z_loss": z_loss,
                 "entropy": losses.mean_entropy(probs_TE),
                 "temperature": tau,
                 "experts_per_token": jnp.mean(
                     jnp.sum(mask_TE.astype(jnp.float32), -1))},
        slots=Slots() if one_slot else Slots(dense=0))
