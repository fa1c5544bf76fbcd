"""Expert-choice routing: exact per-expert load, hand-computed weights, the layer."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.errors import ConfigError
from moejax.moe import MoELayer
from moejax.moe.reference import moe_loop
from moejax.routing import make_router

B, L, D, F, E = 2, 4, 8, 16, 4


@pytest.mark.parametrize("top_k,capacity_factor", [(1, 1.0), (2, 1.0), (1, 0.5)])
def test_every_expert_takes_exactly_capacity_tokens(top_k, capacity_factor):
  router = make_router("expert_choice", num_experts=E, top_k=top_k,
                       options={"capacity_factor": capacity_factor})
  x_TD = jax.random.normal(jax.random.key(0), (B * L, D))
  variables = jax.jit(router.init)(jax.random.key(1), x_TD)
  routing = jax.jit(router.apply)(variables, x_TD)
  capacity = math.ceil(capacity_factor * B * L * top_k / E)
  assert routing.slots.per_expert == capacity
  np.testing.assert_array_equal(routing.mask_TK.sum(axis=0), [capacity] * E)
  np.testing.assert_array_equal(routing.expert_TK,
                                np.broadcast_to(np.arange(E), (B * L, E)))
  assert float(routing.aux_loss) == 0.0


@pytest.mark.parametrize("capacity_factor,mask", [
    # C = ceil(0.7 * 5 * 1 / 2) = 2: expert 0 takes t0 (.9), t1 (.75); expert 1
    # takes t4 (.9), t3 (.75); t2 (.5, .5) is chosen by nobody.
    (0.7, [[1, 0], [1, 0], [0, 0], [0, 1], [0, 1]]),
    # C = ceil(1.1 * 5 / 2) = 3: both experts add t2, which gets two experts.
    (1.1, [[1, 0], [1, 0], [1, 1], [0, 1], [0, 1]]),
])
def test_weights_equal_hand_computation(capacity_factor, mask):
  # Gate W = ln3 * I: token [a, b] has logits [a ln3, b ln3], so
  # S = [3^a, 3^b] / (3^a + 3^b): [2,0] -> [9/10, 1/10], [1,0] -> [3/4, 1/4],
  # [0,0] -> [1/2, 1/2], [0,1] -> [1/4, 3/4], [0,2] -> [1/10, 9/10].
  router = make_router("expert_choice", num_experts=2, top_k=1,
                       options={"capacity_factor": capacity_factor})
  x_TD = jnp.array([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
  gate = math.log(3) * jnp.eye(2)
  routing = router.apply({"params": {"gate": {"kernel": gate}}}, x_TD)
  probs = np.array([[0.9, 0.1], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75],
                    [0.1, 0.9]])
  np.testing.assert_array_equal(routing.mask_TK, np.array(mask, bool))
  np.testing.assert_allclose(routing.weight_TK, probs, rtol=1e-6)
  np.testing.assert_allclose(
      routing.metrics["unrouted_frac"], 0.2 if capacity_factor < 1 else 0.0)


def test_layer_matches_naive_loop_on_both_paths():
  def router():
    return make_router("expert_choice", num_experts=E, top_k=2)

  x_BLD = jax.random.normal(jax.random.key(1), (B, L, D))
  params = nn.unbox(jax.jit(MoELayer("expert_choice", num_experts=E, d_ff=F,
                                          top_k=2).init)(
      jax.random.key(0), x_BLD))["params"]
  routing = jax.jit(router().apply)({"params": params["router"]},
                                    x_BLD.reshape(-1, D))
  expert_TK, mask_TK = np.asarray(routing.expert_TK), np.asarray(routing.mask_TK)

  def naive(p):
    # Selections are fixed (top-C has no gradient); weights are recomputed.
    r = router().apply({"params": p["router"]}, x_BLD.reshape(-1, D))
    y_TD = moe_loop(x_BLD.reshape(-1, D), expert_TK, r.weight_TK, mask_TK,
                    p["experts"]["w_in"], p["experts"]["w_out"])
    return jnp.sum(y_TD**2), y_TD.reshape(B, L, D)

  # Jitted: one compile costs less than running the unrolled loop op by op.
  (_, y_naive), g_naive = jax.jit(jax.value_and_grad(naive, has_aux=True))(
      params)
  for path in ("capacity", "dropless"):
    # The layer's capacity_factor 0.25 would drop tokens: the router's C wins.
    layer = MoELayer("expert_choice", num_experts=E, d_ff=F, top_k=2,
                     dispatch=path, capacity_factor=0.25)

    def fast(p, layer=layer):
      y_BLD, aux = layer.apply({"params": p}, x_BLD)
      return jnp.sum(y_BLD**2), (y_BLD, aux.metrics["drop_frac"])

    (_, (y_fast, drop_frac)), g_fast = jax.jit(
        jax.value_and_grad(fast, has_aux=True))(params)
    np.testing.assert_allclose(y_fast, y_naive, rtol=1e-5, atol=1e-5,
                               err_msg=path)
    assert float(drop_frac) == 0.0, path
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_naive)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=path)


@pytest.mark.parametrize("top_k,options,match", [
    (5, None, r"model.top_k=5 must be between 1 and model.num_experts=4 "
     r"\(top_k: the average number of experts per token\)"),
    (1, {"capacity_factor": 0.0}, "needs capacity_factor > 0"),
])
def test_bad_settings_are_clear_errors(top_k, options, match):
  with pytest.raises(ConfigError, match=match):
    make_router("expert_choice", num_experts=E, top_k=top_k, options=options)
