"""ReMoE (Wang, Zhu, Chen, ICLR 2025): ReLU routing with an adaptive L1 penalty.

Shapes: T tokens, D model width, E experts, K top-k slots (E of them: every
expert is a slot).

Gates G(h) = ReLU(W_r h) (float32); token t uses every expert with G_e > 0,
weighted by G_e (not renormalised), so the number of experts per token varies
and the router is differentiable everywhere but at 0. Sparsity is driven by
lambda * L1 with the load-balanced L1 of the paper (and its reference code):

  L1 = E * sum_e f_e * P_e,  f_e = c_e / (T * k),  P_e = mean_t G_e(h_t),

c_e the tokens with G_e > 0 (a count: no gradient), k = model.top_k; at the
target with a balanced load f_e = 1/E and L1 = mean_t |G(h_t)|_1, the plain L1
(`load_balanced=False`). After each training step
lambda <- lambda * alpha^sign(target - sparsity), sparsity = share of zero
gates in the step's batch, target = 1 - k/E by default.

Deviation from the paper, stated: lambda is per MoE layer (state of that
layer's router, in the `router_state` collection, checkpointed), driven by that
layer's sparsity; the paper keeps one lambda for the model, driven by the mean
sparsity over layers. Counts are over the global batch (the router sees every
token), where the reference counts per data-parallel rank.
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax.routing.contract import (ROUTER_STATE, Router, Routing, Slots,
                                     TokenLayout, accumulating, batch_total,
                                     gate_logits)


def remoe_l1(gates_TE: jax.Array, top_k: int, load_balanced: bool = True
             ) -> jax.Array:
  """The L1 term: E * sum_e c_e / (T k) * mean_t G_e, or mean_t sum_e G_e."""
  num_tokens, num_experts = gates_TE.shape
  p_E = jnp.mean(gates_TE, axis=0)
  if not load_balanced:
    return jnp.sum(p_E)
  counts_E = jnp.sum((gates_TE > 0).astype(jnp.float32), axis=0)
  return num_experts * jnp.sum(counts_E / (num_tokens * top_k) * p_E)


def adapt_l1_coef(coef: jax.Array, sparsity: jax.Array, target: float,
                  alpha: float) -> jax.Array:
  """lambda * alpha when sparsity < target, else lambda / alpha."""
  return coef * jnp.where(sparsity < target, alpha, 1.0 / alpha)


class ReMoERouter(Router):
  """ReLU gates over every expert; lambda * L1 steers sparsity to a target.

  Attributes:
    l1_coef_init: lambda_0 (1e-8 in the paper and its code).
    l1_alpha: alpha, lambda's multiplicative step (1.2).
    target_sparsity: share of zero gates to reach; -1: 1 - top_k / E.
    load_balanced: weight the L1 by expert load (the paper's default), else
      the plain L1.
  """

  l1_coef_init: float = 1e-8
  l1_alpha: float = 1.2
  target_sparsity: float = -1.0
  load_balanced: bool = True

  # Every expert is a slot; capacity buffers would hold T rows per expert.
  dispatch_paths: ClassVar[tuple[str, ...]] = ("dropless",)
  top_k_means: ClassVar[str] = ("target experts per token (target sparsity "
                                "1 - top_k / num_experts)")

  @classmethod
  def check_options(cls, options: dict[str, Any], *, num_experts: int,
                    top_k: int) -> None:
    super().check_options(options, num_experts=num_experts, top_k=top_k)
    target = options["target_sparsity"]
    if not options["l1_coef_init"] > 0 or not options["l1_alpha"] > 1:
      raise ConfigError("router 'remoe' needs l1_coef_init > 0 and l1_alpha > 1")
    if target != -1 and not 0 <= target < 1:
      raise ConfigError(f"router 'remoe' target_sparsity={target}; use a share "
                        "in [0, 1), or -1 for 1 - top_k / num_experts")

  def target(self) -> float:
    """The sparsity lambda steers to."""
    if self.target_sparsity == -1:
      return 1.0 - self.top_k / self.num_experts
    return self.target_sparsity

  @nn.compact
  def __call__(self, x_TD: jax.Array, *, token_ids_T: jax.Array | None = None,
               step: jax.Array | None = None,
               layout: TokenLayout | None = None,
               deterministic: bool = True) -> Routing:
    del token_ids_T, step, layout
    num_tokens, num_experts = x_TD.shape[0], self.num_experts
    gates_TE = jax.nn.relu(gate_logits(x_TD, num_experts))
    mask_TE = gates_TE > 0
    coef = self.variable(ROUTER_STATE, "l1_coef",
                         lambda: jnp.asarray(self.l1_coef_init, jnp.float32))
    l1 = remoe_l1(gates_TE, self.top_k, self.load_balanced)
    sparsity = 1.0 - jnp.mean(mask_TE.astype(jnp.float32))
    lam = coef.value
    if (not deterministic and self.is_mutable_collection(ROUTER_STATE)
        and not self.is_initializing()):
      step_sparsity = sparsity
      if accumulating(self):  # The whole accumulated batch's share.
        open_gates = batch_total(self, "open_gates",
                                 jnp.sum(mask_TE.astype(jnp.float32)))
        gates = batch_total(self, "gates",
                            jnp.asarray(mask_TE.size, jnp.float32))
        step_sparsity = 1.0 - open_gates / gates
      coef.value = adapt_l1_coef(lam, step_sparsity, self.target(),
                                 self.l1_alpha)
    expert_TE = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32),
                                 (num_tokens, num_experts))
    return Routing(
        expert_TK=expert_TE, weight_TK=gates_TE, mask_TK=mask_TE,
        aux_loss=lam * l1,
        metrics={"l1_loss": l1, "l1_coef": lam, "sparsity": sparsity,
                 "experts_per_token": jnp.mean(
                     jnp.sum(mask_TE.astype(jnp.float32), -1))},
        slots=Slots(dense=0))  # Pays for the gates that are open (budgets).
