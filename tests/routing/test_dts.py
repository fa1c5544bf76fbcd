"""EvoMoE's DTS gate: the temperature schedule by hand, dense -> sparse routing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.routing import make_router
from moejax.routing.dts import dts_temperature


@pytest.mark.parametrize("schedule,step,want", [
    # exponential: max(2 * (0.5/2)^(step/100), 0.5)
    ("exponential", 0, 2.0),
    ("exponential", 50, 2.0 * 0.25 ** 0.5),  # = 1.0
    ("exponential", 100, 0.5),
    ("exponential", 250, 0.5),  # Clamped at tau_min.
    # linear: max(2 - 1.5 * step/100, 0.5)
    ("linear", 0, 2.0),
    ("linear", 40, 2.0 - 0.6),  # = 1.4
    ("linear", 100, 0.5),
    ("linear", 180, 0.5),
])
def test_temperature_at_chosen_steps(schedule, step, want):
  tau = dts_temperature(step, tau_max=2.0, tau_min=0.5, anneal_steps=100,
                        schedule=schedule)
  assert math.isclose(float(tau), want, rel_tol=1e-6)


def _route(deterministic, step, **options):
  router = make_router("dts", num_experts=8, options=options)
  x_TD = jax.random.normal(jax.random.key(0), (256, 16))
  variables = router.init(jax.random.key(1), x_TD)
  routing = router.apply(variables, x_TD, deterministic=deterministic,
                         step=jnp.asarray(step), rngs={"router": jax.random.key(2)})
  return routing, variables, x_TD


def test_gate_goes_from_dense_to_sparse_as_tau_falls():
  hot, _, _ = _route(False, 0, tau_max=5.0, tau_min=0.05, anneal_steps=100)
  cold, _, _ = _route(False, 100, tau_max=5.0, tau_min=0.05, anneal_steps=100)
  hot_k = float(hot.metrics["experts_per_token"])
  cold_k = float(cold.metrics["experts_per_token"])
  assert hot_k > 6 and cold_k < 2, (hot_k, cold_k)
  # Used exactly when the Gumbel-softmax weight exceeds the threshold.
  np.testing.assert_array_equal(hot.mask_TK, hot.weight_TK > 1e-3)


def test_hard_phase_is_sampled_top1_and_evaluation_deterministic_top1():
  hard, _, _ = _route(False, 10, hard_step=10)
  np.testing.assert_array_equal(hard.mask_TK.sum(-1), 1)
  np.testing.assert_array_equal(np.argmax(hard.mask_TK, -1),
                                np.argmax(hard.weight_TK, -1))
  ev, variables, x_TD = _route(True, 0)
  logits = x_TD @ variables["params"]["gate"]["kernel"].value
  np.testing.assert_array_equal(np.argmax(ev.mask_TK, -1), np.argmax(logits, -1))
  np.testing.assert_array_equal(ev.mask_TK.sum(-1), 1)
