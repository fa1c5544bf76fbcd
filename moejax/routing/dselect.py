"""DSelect-k (Hazimeh et al. 2021): k differentiable binary-coded expert selectors.

Shapes: T tokens, D model width, E experts, K top-k slots (E of them: slot e is
expert e), J codes (2^U), U code bits (ceil(log2 E), at least 1), W selectors
(top_k of them).

Selector i reads U smooth-step units S(z_ib), z_i an affine map of h_t, as a
soft binary code: its weight on code j is prod_b (S(z_ib) if bit b of j is 1
else 1 - S(z_ib)). S is exactly 0 or 1 outside |z| < gamma/2, so once the codes
saturate each selector puts all its weight on one expert and at most k experts
are active per token. Early in training every expert is active (dense).
"""

import math

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.errors import ConfigError
from moejax.routing import losses
from moejax.routing.contract import Router, Routing, Slots, TokenLayout


def smooth_step(z: jax.Array, gamma: float = 1.0) -> jax.Array:
  """S(z): 0 for z <= -g/2, 1 for z >= g/2, -2z^3/g^3 + 3z/(2g) + 1/2 between.

  S is C^1: S(+-g/2) matches the constants and S'(+-g/2) = 0.
  """
  cubic = -2.0 * z**3 / gamma**3 + 3.0 * z / (2.0 * gamma) + 0.5
  return jnp.where(z <= -gamma / 2, 0.0, jnp.where(z >= gamma / 2, 1.0, cubic))


def code_bits(num_experts: int) -> np.ndarray:
  """bool[J, U]: bit b of code j (U = max(1, ceil(log2 E)), J = 2^U)."""
  num_bits = max(1, math.ceil(math.log2(num_experts)))
  codes_J = np.arange(2**num_bits)
  return ((codes_J[:, None] >> np.arange(num_bits)) & 1).astype(bool)


def code_to_expert(num_experts: int) -> np.ndarray:
  """float32[J, E]: 1 where code j means expert e.

  When E is not a power of 2, codes j >= E name no expert; they mean expert
  j - 2^(U-1) (their top bit is ignored). So a selector's weights over the E
  experts always sum to 1 and a saturated code always names a real expert
  (the reference instead adds a 1/sum(reachable weight) penalty). Experts with
  two codes start with twice the weight of the others.
  """
  num_codes = code_bits(num_experts).shape[0]
  codes_J = np.arange(num_codes)
  expert_J = np.where(codes_J < num_experts, codes_J, codes_J - num_codes // 2)
  return np.eye(num_experts, dtype=np.float32)[expert_J]


def selector_weights(z_TWU: jax.Array, num_experts: int,
                     gamma: float) -> jax.Array:
  """float32[T, W, E]: each selector's distribution over experts (sums to 1)."""
  s_TWU = smooth_step(z_TWU, gamma)
  bits_JU = jnp.asarray(code_bits(num_experts))
  per_bit_TWJU = jnp.where(bits_JU, s_TWU[:, :, None, :],
                           1.0 - s_TWU[:, :, None, :])
  codes_TWJ = jnp.prod(per_bit_TWJU, axis=-1)
  return jnp.einsum("twj,je->twe", codes_TWJ,
                    jnp.asarray(code_to_expert(num_experts)))


def selector_entropy(sel_TWE: jax.Array) -> jax.Array:
  """Mean over tokens of the summed selector entropies (the reference's form).

  The 1e-6 inside the log keeps the gradient finite where a weight is exactly 0.
  """
  return -jnp.mean(jnp.sum(sel_TWE * jnp.log(sel_TWE + 1e-6), axis=(1, 2)))


class DSelectKRouter(Router):
  """Per-token DSelect-k: weight_e = sum_i softmax(a)_i * selector_i(e).

  z (W x U code logits) and a (W mixing logits), both affine in h, in
  float32, initialised as the reference code: uniform in +-gamma/100 (every
  S(z) starts in its cubic region, all experts active) and +-0.05. The
  entropy regulariser (weight `entropy_reg`) drives every selector to one
  expert; it is the whole aux loss. Routing has K = E slots, one per expert,
  ordered by descending weight (ties: lower expert first), a slot used iff its
  weight > 0. The first k slots are `Slots.dense`: once the codes are
  binary they hold every used expert, so the dropless path computes them at a
  static T*k rows and the run-time budget switch covers only the other E - k
  (empty then, and nearly so while a few codes are still saturating). It fixes
  `Slots.per_expert` = T, so the capacity path drops nothing even in the dense
  early phase (it then costs E*T rows, like dropless).

  Attributes:
    gamma: width of the smooth step's cubic region (the paper's default 1).
    entropy_reg: weight of the selector-entropy regulariser (our default; the
      public code leaves it to the user).
  """

  gamma: float = 1.0
  entropy_reg: float = 1e-2

  top_k_means: ClassVar[str] = "the number of selectors"


  @classmethod
  def check_options(cls, options: dict[str, Any], *, num_experts: int,
                    top_k: int) -> None:
    super().check_options(options, num_experts=num_experts, top_k=top_k)
    if not (options["gamma"] > 0 and options["entropy_reg"] >= 0):
      raise ConfigError(
          "router 'dselect_k' needs gamma > 0 and entropy_reg >= 0, got "
          f"gamma={options['gamma']}, entropy_reg={options['entropy_reg']}")

  @nn.compact
  def __call__(self, x_TD: jax.Array, *, token_ids_T: jax.Array | None = None,
               step: jax.Array | None = None,
               layout: TokenLayout | None = None,
               deterministic: bool = True) -> Routing:
    del token_ids_T, step, layout, deterministic  # One rule throughout.
    num_tokens = x_TD.shape[0]
    num_selectors = self.top_k
    num_bits = code_bits(self.num_experts).shape[1]

    def uniform(limit):
      def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)
      return init

    def dense(features, limit, name):
      # The reference gives both Dense layers a bias drawn like the kernel.
      return nn.Dense(
          features, dtype=jnp.float32, param_dtype=jnp.float32, name=name,
          kernel_init=nn.with_logical_partitioning(uniform(limit),
                                                   ("embed", None)),
          bias_init=nn.with_logical_partitioning(uniform(limit), (None,)))

    x_TD = x_TD.astype(jnp.float32)
    z_TWU = dense(num_selectors * num_bits, self.gamma / 100.0, "code")(
        x_TD).reshape(num_tokens, num_selectors, num_bits)
    alpha_TW = jax.nn.softmax(dense(num_selectors, 0.05, "mix")(x_TD), axis=-1)
    sel_TWE = selector_weights(z_TWU, self.num_experts, self.gamma)
    weight_TE = jnp.einsum("tw,twe->te", alpha_TW, sel_TWE)
    entropy = selector_entropy(sel_TWE)
    # Every expert once, heaviest first (lax.top_k: lower index on ties).
    weight_TK, expert_TK = jax.lax.top_k(weight_TE, self.num_experts)
    mask_TK = weight_TK > 0
    return Routing(
        expert_TK=expert_TK.astype(jnp.int32),
        weight_TK=weight_TK,
        mask_TK=mask_TK,
        aux_loss=self.entropy_reg * entropy,
        metrics={"selector_entropy": entropy,
                 "entropy": losses.mean_entropy(weight_TE),
                 # Experts per token: E while dense, <= top_k once converged.
                 "active_experts": jnp.mean(jnp.sum(mask_TK, axis=-1).astype(
                     jnp.float32))},
        slots=Slots(per_expert=num_tokens, dense=num_selectors))
