"""Softmax top-k routers: Switch (top-1) and GShard-style top-k.

Shapes: T tokens, D model width, E experts, K = top_k.
"""

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.routing import losses
from moejax.routing.contract import Router, Routing


class TopKRouter(Router):
  """p = softmax(W_r h) in float32; each token goes to its k most probable experts.

  Attributes:
    jitter: multiplicative input noise U(1-eps, 1+eps) in training (Switch), 0: off.
    aux_loss_coef: weight alpha of the load-balancing loss.
    z_loss_coef: weight beta of the router z-loss.
    renormalize: rescale the k gates to sum to 1 (GShard top-2); ignored for k=1.
  """

  jitter: float = 0.0
  aux_loss_coef: float = 1e-2
  z_loss_coef: float = 1e-3
  renormalize: bool = True

  @nn.compact
  def __call__(self, x_TD: jax.Array, *, token_ids_T: jax.Array | None = None,
               deterministic: bool = True) -> Routing:
    del token_ids_T  # Routing depends on hidden states only.
    x_TD = x_TD.astype(jnp.float32)
    if self.jitter > 0 and not deterministic:
      noise_TD = jax.random.uniform(
          self.make_rng("router"), x_TD.shape, jnp.float32,
          1.0 - self.jitter, 1.0 + self.jitter)
      x_TD = x_TD * noise_TD
    logits_TE = nn.Dense(
        self.num_experts, use_bias=False, dtype=jnp.float32,
        param_dtype=jnp.float32, name="gate",
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("embed", None)))(x_TD)
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    weight_TK, expert_TK = jax.lax.top_k(probs_TE, self.top_k)
    if self.renormalize and self.top_k > 1:
      weight_TK = weight_TK / jnp.sum(weight_TK, axis=-1, keepdims=True)
    mask_TK = jnp.ones(expert_TK.shape, jnp.bool_)
    balance = losses.load_balancing_loss(probs_TE, expert_TK, mask_TK)
    z_loss = losses.router_z_loss(logits_TE)
    return Routing(
        expert_TK=expert_TK.astype(jnp.int32),
        weight_TK=weight_TK,
        mask_TK=mask_TK,
        aux_loss=self.aux_loss_coef * balance + self.z_loss_coef * z_loss,
        metrics={"balance_loss": balance, "z_loss": z_loss,
                 "entropy": losses.mean_entropy(probs_TE)})


class SwitchRouter(TopKRouter):
  """Switch Transformer routing: top-1 of a float32 softmax, gate = p_a."""

  top1_only: ClassVar[bool] = True

