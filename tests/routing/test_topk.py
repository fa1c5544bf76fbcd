"""Switch / top-k routers: the aux loss by hand, the registry's errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.errors import ConfigError
from moejax.routing import (ROUTERS, load_balancing_loss, make_router,
                            router_z_loss)


def test_switch_aux_loss_equals_hand_computation():
  # Gate W = [[ln 3, 0], [0, ln 3]]; three tokens x = [1, 0] -> p = [0.75, 0.25]
  # (argmax 0), one token x = [0, 1] -> p = [0.25, 0.75] (argmax 1).
  # f = [3/4, 1/4]; P = [(3*0.75 + 0.25)/4, (3*0.25 + 0.75)/4] = [0.625, 0.375].
  # L_lb = E * sum f*P = 2 * (0.75*0.625 + 0.25*0.375) = 1.125.
  # Every token has logsumexp = ln(3 + 1) = ln 4, so z = (ln 4)^2.
  router = make_router("switch", num_experts=2,
                       options={"aux_loss_coef": 0.01, "z_loss_coef": 0.001})
  x_TD = jnp.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  gate = jnp.array([[math.log(3), 0.0], [0.0, math.log(3)]])
  routing = router.apply({"params": {"gate": {"kernel": gate}}}, x_TD)
  np.testing.assert_array_equal(routing.expert_TK[:, 0], [0, 0, 0, 1])
  np.testing.assert_allclose(routing.weight_TK[:, 0], [0.75] * 4, rtol=1e-6)
  np.testing.assert_allclose(routing.metrics["balance_loss"], 1.125, rtol=1e-6)
  np.testing.assert_allclose(routing.metrics["z_loss"], math.log(4) ** 2,
                             rtol=1e-6)
  np.testing.assert_allclose(
      routing.aux_loss, 0.01 * 1.125 + 0.001 * math.log(4) ** 2, rtol=1e-6)


def test_balance_loss_is_one_when_uniform():
  probs_TE = jnp.full((8, 4), 0.25)
  expert_TK = jnp.arange(8, dtype=jnp.int32)[:, None] % 4
  np.testing.assert_allclose(
      load_balancing_loss(probs_TE, expert_TK, jnp.ones((8, 1), bool)), 1.0)
  np.testing.assert_allclose(router_z_loss(jnp.zeros((3, 4))), math.log(4) ** 2,
                             rtol=1e-6)


def test_topk_renormalizes_and_picks_largest():
  router = make_router("topk", num_experts=4, top_k=2)
  x_TD = jax.random.normal(jax.random.key(0), (16, 8))
  variables = router.init(jax.random.key(1), x_TD)
  routing = router.apply(variables, x_TD)
  np.testing.assert_allclose(routing.weight_TK.sum(-1), 1.0, rtol=1e-6)
  logits = x_TD @ variables["params"]["gate"]["kernel"].value
  expected = np.argsort(-np.asarray(logits), axis=-1)[:, :2]
  np.testing.assert_array_equal(routing.expert_TK, expected)


def test_jitter_only_in_training():
  router = make_router("switch", num_experts=4, options={"jitter": 0.5})
  x_TD = jax.random.normal(jax.random.key(0), (64, 8))
  variables = router.init(jax.random.key(1), x_TD)
  a = router.apply(variables, x_TD)
  b = router.apply(variables, x_TD)
  np.testing.assert_array_equal(a.weight_TK, b.weight_TK)
  c = router.apply(variables, x_TD, deterministic=False,
                   rngs={"router": jax.random.key(2)})
  assert not np.allclose(a.weight_TK, c.weight_TK)


def test_unknown_router_lists_valid_names():
  with pytest.raises(ConfigError, match="unknown router 'nope'; valid routers: "
                     + ", ".join(sorted(ROUTERS))):
    make_router("nope", num_experts=4)


@pytest.mark.parametrize("name,top_k,options,match", [
    ("topk", 5, None, "model.top_k=5 must be between 1 and model.num_experts=4"),
    ("topk", 0, None, "model.top_k=0"),
    ("switch", 2, None, "router 'switch' sends each token to one expert"),
    ("topk", 2, {"gamma": 1.0}, "router 'topk' has no option 'gamma'"),
])
def test_bad_router_settings_are_clear_errors(name, top_k, options, match):
  with pytest.raises(ConfigError, match=match):
    make_router(name, num_experts=4, top_k=top_k, options=options)
