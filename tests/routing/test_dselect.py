"""DSelect-k: the smooth step, selector arithmetic, convergence to k experts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.errors import ConfigError
from moejax.routing import make_router, smooth_step
from moejax.routing.dselect import code_to_expert, selector_weights

D = 8


@pytest.mark.parametrize("gamma", [1.0, 0.3])
def test_smooth_step_values_and_derivative_at_the_boundaries(gamma):
  half = gamma / 2
  assert float(smooth_step(jnp.float32(-half), gamma)) == 0.0
  assert float(smooth_step(jnp.float32(half), gamma)) == 1.0
  assert float(smooth_step(jnp.float32(0.0), gamma)) == 0.5
  grad = jax.vmap(jax.grad(lambda z: smooth_step(z, gamma)))
  # S'(z) = -6z^2/g^3 + 3/(2g): 0 at +-g/2, 3/(2g) at 0, 0 outside.
  np.testing.assert_allclose(
      grad(jnp.array([-half, half, 0.0, -2 * half, 2 * half])),
      [0.0, 0.0, 1.5 / gamma, 0.0, 0.0], atol=1e-5)
  # Continuous: just inside each boundary the cubic is within O(delta^2).
  delta = 1e-3 * gamma
  s_in = smooth_step(jnp.array([-half + delta, half - delta]), gamma)
  np.testing.assert_allclose(s_in, [0.0, 1.0], atol=1e-5)
  assert np.all(np.diff(np.asarray(
      smooth_step(jnp.linspace(-gamma, gamma, 101), gamma))) >= 0)


def test_selector_weights_by_hand():
  # E = 4, M = 2 bits, bit b of code j is (j >> b) & 1.
  # z = [+g/2, -g/2] -> S = [1, 0]: only code 0b01 = expert 1.
  # z = [0, 0] -> S = [1/2, 1/2]: every code 1/4.
  # z = [0, +g/2] -> S = [1/2, 1]: codes 0b10, 0b11 = experts 2, 3 at 1/2.
  z_TWU = jnp.array([[[0.5, -0.5]], [[0.0, 0.0]], [[0.0, 0.5]]])
  np.testing.assert_allclose(
      selector_weights(z_TWU, 4, gamma=1.0)[:, 0],
      [[0, 1, 0, 0], [0.25] * 4, [0, 0, 0.5, 0.5]], atol=1e-7)


def test_slots_are_the_experts_heaviest_first_and_k_fixed():
  """K = E slots, every expert once, by descending weight; the first k are
  dense (`Slots.dense`); once the codes are binary no token uses a slot after them."""
  num_experts, top_k = 8, 2
  router = make_router("dselect_k", num_experts=num_experts, top_k=top_k)
  x_TD = jax.random.normal(jax.random.key(0), (16, D))
  params = nn.unbox(router.init(jax.random.key(1), x_TD))["params"]

  def expected_weights(p):  # The selector maths over experts in order.
    z_TWU = (x_TD @ p["code"]["kernel"] + p["code"]["bias"]).reshape(
        16, top_k, 3)
    alpha_TW = jax.nn.softmax(x_TD @ p["mix"]["kernel"] + p["mix"]["bias"])
    return jnp.einsum("tw,twe->te", alpha_TW,
                      selector_weights(z_TWU, num_experts, gamma=1.0))

  binary = {**params, "code": {"kernel": jnp.zeros_like(params["code"]["kernel"]),
                               "bias": jnp.where(params["code"]["bias"] >= 0,
                                                 1.0, -1.0)}}
  for p in (params, binary):
    routing = router.apply({"params": p}, x_TD)
    assert routing.slots.dense == top_k and routing.slots.sparse(num_experts)
    np.testing.assert_array_equal(np.sort(routing.expert_TK, axis=1),
                                  np.tile(np.arange(num_experts), (16, 1)))
    assert np.all(np.diff(np.asarray(routing.weight_TK), axis=1) <= 0)
    np.testing.assert_allclose(routing.expert_weights(num_experts),
                               expected_weights(p), rtol=1e-6, atol=1e-7)
  assert np.all(routing.mask_TK[:, 0]) and not np.any(
      routing.mask_TK[:, top_k:])


def test_codes_beyond_e_fold_onto_real_experts():
  # E = 5 needs M = 3 bits; codes 5, 6, 7 drop their top bit (4) -> 1, 2, 3.
  np.testing.assert_array_equal(code_to_expert(5).argmax(axis=1),
                                [0, 1, 2, 3, 4, 1, 2, 3])
  # A selector saturated on code 7 = 0b111 puts all its weight on expert 3.
  weights = selector_weights(jnp.full((1, 1, 3), 0.5), 5, gamma=1.0)
  np.testing.assert_allclose(weights[0, 0], [0, 0, 0, 1, 0])


@pytest.mark.parametrize("num_experts,top_k", [(5, 2), (1, 1), (8, 3)])
def test_weights_sum_to_one_and_start_dense(num_experts, top_k):
  router = make_router("dselect_k", num_experts=num_experts, top_k=top_k)
  x_TD = jax.random.normal(jax.random.key(0), (12, D))
  variables = jax.jit(router.init)(jax.random.key(1), x_TD)
  routing = jax.jit(router.apply)(variables, x_TD)
  np.testing.assert_allclose(routing.weight_TK.sum(axis=-1), 1.0, rtol=1e-6)
  # Init keeps every S(z) in its cubic region: every expert is active.
  assert np.all(routing.mask_TK)
  assert routing.slots.per_expert == 12
  np.testing.assert_allclose(
      routing.aux_loss, 1e-2 * routing.metrics["selector_entropy"], rtol=1e-6)


def test_training_converges_to_at_most_k_experts_per_token():
  num_tokens, num_experts, top_k = 32, 5, 2
  router = make_router("dselect_k", num_experts=num_experts, top_k=top_k,
                       options={"entropy_reg": 0.1})
  key_x, key_v, key_r = jax.random.split(jax.random.key(0), 3)
  x_TD = jax.random.normal(key_x, (num_tokens, D))
  y_T = jnp.sin(x_TD[:, 0]) + x_TD[:, 1]
  params = {"router": nn.unbox(router.init(key_r, x_TD))["params"],
            "experts": 0.3 * jax.random.normal(key_v, (num_experts, D))}

  def loss(p):
    # Linear experts mixed by the router: a small regression plus the reg.
    routing = router.apply({"params": p["router"]}, x_TD)
    pred_T = jnp.sum(routing.expert_weights(num_experts)
                     * (x_TD @ p["experts"].T), axis=-1)
    return jnp.mean((pred_T - y_T) ** 2) + routing.aux_loss

  tx = optax.adam(0.05)

  @jax.jit
  def train(p):
    def step(carry, _):
      p, opt = carry
      grads = jax.grad(loss)(p)
      updates, opt = tx.update(grads, opt, p)
      return (optax.apply_updates(p, updates), opt), None
    return jax.lax.scan(step, (p, tx.init(p)), None, length=300)[0][0]

  params = train(params)
  routing = router.apply({"params": params["router"]}, x_TD)
  weight_TE = np.asarray(routing.expert_weights(num_experts))
  assert np.all((weight_TE > 1e-3).sum(axis=-1) <= top_k)
  np.testing.assert_allclose(weight_TE.sum(axis=-1), 1.0, rtol=1e-6)
  assert float(loss(params)) < float(jnp.mean(y_T**2))


@pytest.mark.parametrize("top_k,options,match", [
    (5, None, r"model.top_k=5 must be between .* \(top_k: the number of selectors\)"),
    (2, {"gamma": 0.0}, "needs gamma > 0"),
])
def test_bad_settings_are_clear_errors(top_k, options, match):
  with pytest.raises(ConfigError, match=match):
    make_router("dselect_k", num_experts=4, top_k=top_k, options=options)
