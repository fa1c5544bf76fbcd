"""EvoMoE's DTS gate: the temperature schedule by hand, dense -> sparse routing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.errors import ConfigError
from moejax.routing import make_router
from moejax.routing.dts import dts_temperature, reference_balance_loss
from moejax.train import parse
from moejax.train.presets import method_config


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


def _expert_T(routing) -> np.ndarray:
  """The expert of each token's used slot (one per token)."""
  mask_TK = np.asarray(routing.mask_TK)
  assert np.all(mask_TK.sum(-1) == 1)
  return np.asarray(routing.expert_TK)[mask_TK]


def _probs(variables, x_TD):
  return jax.nn.softmax(x_TD @ variables["params"]["gate"]["kernel"].value, -1)


def test_gate_goes_from_dense_to_sparse_as_tau_falls():
  options = dict(tau_max=5.0, tau_min=0.05, anneal_steps=100, combine="gumbel")
  hot, _, _ = _route(False, 0, **options)
  cold, _, _ = _route(False, 100, **options)
  hot_k = float(hot.metrics["experts_per_token"])
  cold_k = float(cold.metrics["experts_per_token"])
  assert hot_k > 6 and cold_k < 2, (hot_k, cold_k)
  # Used exactly when the Gumbel-softmax weight exceeds the threshold.
  np.testing.assert_array_equal(hot.mask_TK, hot.weight_TK > 1e-3)


def test_softmax_combine_is_one_definition_in_training_and_evaluation():
  soft, variables, x_TD = _route(False, 0)  # The default: combine="softmax".
  probs_TE = np.asarray(_probs(variables, x_TD))
  np.testing.assert_allclose(soft.weight_TK, probs_TE, rtol=1e-6)
  ev, _, _ = _route(True, 0)
  assert ev.expert_TK.shape == (256, 1) and not ev.slots.sparse(1)  # One slot.
  np.testing.assert_array_equal(_expert_T(ev), probs_TE.argmax(-1))
  np.testing.assert_allclose(ev.weight_TK[:, 0], probs_TE.max(-1), rtol=1e-6)


def test_gumbel_combine_evaluates_a_gumbel_sample_too():
  ev, variables, x_TD = _route(True, 0, combine="gumbel", tau_min=0.5)
  np.testing.assert_array_equal(ev.mask_TK.sum(-1), 1)
  weight_T = np.asarray(ev.weight_TK)[np.asarray(ev.mask_TK)]
  # The weight of the chosen expert is the largest of a Gumbel-softmax sample
  # at tau_min: above the plain softmax's largest for these near-uniform gates.
  assert weight_T.mean() > 2 * float(_probs(variables, x_TD).max(-1).mean())
  # Without a `router` rng, evaluation is deterministic.
  router = make_router("dts", num_experts=8, options={"combine": "gumbel"})
  again = router.apply(variables, x_TD)
  np.testing.assert_array_equal(again.weight_TK, router.apply(variables,
                                                              x_TD).weight_TK)


@pytest.mark.parametrize("hard_step,step,hard", [
    (10, 9, False), (10, 10, True),
    (-1, 0, True),  # The reference's -1: sampled top-1 from the first update.
    (0, 0, True), (None, 10**6, False)])  # None: never.
def test_hard_step_semantics(hard_step, step, hard):
  routing, _, _ = _route(False, step, hard_step=hard_step)
  per_token = np.asarray(routing.mask_TK.sum(-1))
  assert np.all(per_token == 1) == hard


def test_hard_phase_is_sampled_top1_and_evaluation_deterministic_top1():
  hard, variables, x_TD = _route(False, 10, hard_step=10)
  np.testing.assert_array_equal(hard.mask_TK.sum(-1), 1)
  probs_TE = np.asarray(_probs(variables, x_TD))
  # Sampled: not always the most probable expert.
  assert np.any(_expert_T(hard) != probs_TE.argmax(-1))
  ev, _, _ = _route(True, 0)
  np.testing.assert_array_equal(_expert_T(ev), probs_TE.argmax(-1))


@pytest.mark.parametrize("combine", ["softmax", "gumbel"])
def test_hard_phase_program_routes_as_the_e_slot_router(combine):
  """From hard_step on, the phase's override (hard_step=-1) routes each token
  to the same expert with the same weight, losses and metrics, in one slot
  instead of E."""
  router = make_router("dts", num_experts=8, options={"hard_step": 10})
  phases = type(router).phases({"hard_step": 10}, stage_steps=30)
  assert phases == ((0, {}), (10, {"hard_step": -1}))
  for step in (10, 17):
    e_slot, variables, x_TD = _route(False, step, hard_step=10, combine=combine)
    one, _, _ = _route(False, step, combine=combine, **phases[1][1])
    assert e_slot.slots.sparse(8) and e_slot.expert_TK.shape == (256, 8)
    assert not one.slots.sparse(1) and one.expert_TK.shape == (256, 1)
    np.testing.assert_array_equal(_expert_T(one), _expert_T(e_slot))
    np.testing.assert_array_equal(
        np.asarray(one.weight_TK)[:, 0],
        np.asarray(e_slot.weight_TK)[np.asarray(e_slot.mask_TK)])
    np.testing.assert_array_equal(one.aux_loss, e_slot.aux_loss)
    for name, value in e_slot.metrics.items():
      np.testing.assert_array_equal(one.metrics[name], value, err_msg=name)


@pytest.mark.parametrize("hard_step,stage_steps", [
    (None, 30), (-1, 30), (0, 30), (30, 30), (45, 30)])
def test_one_phase_when_the_hard_phase_is_static_or_never_reached(hard_step,
                                                                  stage_steps):
  router = make_router("dts", num_experts=8, options={"hard_step": hard_step})
  assert type(router).phases({"hard_step": hard_step}, stage_steps) == ((0, {}),)


def test_max_experts_caps_the_soft_phase():
  capped, _, _ = _route(False, 0, max_experts=3, combine="gumbel")
  assert capped.expert_TK.shape == (256, 3)
  assert int(capped.mask_TK.sum(-1).max()) == 3
  full, _, _ = _route(False, 0, combine="gumbel")
  # The cap keeps each token's 3 largest gates among those above threshold.
  above_TE = np.where(full.mask_TK, full.weight_TK, 0.0)
  top3_T = np.sort(above_TE, -1)[:, -3:].sum(-1)
  kept_T = np.where(capped.mask_TK, capped.weight_TK, 0).sum(-1)
  np.testing.assert_allclose(kept_T, top3_T, rtol=1e-6)


def test_reference_balance_loss_by_hand():
  # 4 tokens, 2 experts. mask = [[1,0],[1,0],[1,1],[0,1]], gates g.
  # me = mean of masked gates = [(.6+.7+.5)/4, (.5+.9)/4] = [.45, .35]
  # ce = share of tokens using each = [3/4, 2/4]
  # loss = E^2 * mean(me * ce) = 4 * (.45*.75 + .35*.5) / 2 = 1.025
  gates_TE = jnp.array([[.6, .4], [.7, .3], [.5, .5], [.1, .9]])
  mask_TE = jnp.array([[1, 0], [1, 0], [1, 1], [0, 1]], bool)
  assert float(reference_balance_loss(gates_TE, mask_TE)) == pytest.approx(1.025)
  # Both forms as router options; the reference's form is the default.
  ref, _, _ = _route(False, 0)
  switch, _, _ = _route(False, 0, balance="switch")
  assert float(ref.metrics["balance_loss"]) != float(
      switch.metrics["balance_loss"])


def test_bad_options_are_one_line_errors():
  for options, match in [({"combine": "mean"}, "combine='mean'"),
                         ({"balance": "x"}, "balance='x'"),
                         ({"hard_step": 1.5}, "hard_step=1.5"),
                         ({"max_experts": -1}, "max_experts=-1")]:
    with pytest.raises(ConfigError, match=match):
      make_router("dts", num_experts=8, options=options)


def _preset_router(**overrides):
  """The evomoe preset's DTS router (D=128, E=8), options as the preset sets."""
  run = parse(method_config("evomoe"))
  moe = run.stages[1].model.moe
  options = {**dict(moe.router_options), **overrides}
  router = make_router("dts", num_experts=moe.num_experts, options=options)
  return router, options, run.stages[1].model.d_model


@pytest.mark.parametrize("combine", ["softmax", "gumbel"])
def test_preset_hard_phase_weighs_tokens_alike_in_training_and_evaluation(
    combine):
  """The hard-phase combine weight in training and in evaluation: one definition.

  Before, training weighed by the Gumbel sample at tau_min and evaluation by the
  softmax: mean weight 0.71 against 0.17 at init (4.2x). Now:
  - softmax (the preset's, the reference's default): both weigh a token by
    softmax(l) at its expert; training samples the expert (so its mean weight
    is E_a~p[p_a] = mean sum_e p_e^2, within sampling noise), evaluation takes
    the argmax, as the reference does;
  - gumbel: both weigh by a Gumbel-softmax sample at tau_min (the temperature
    of the hard phase, past the annealing): the means agree within noise.
  """
  router, options, d_model = _preset_router(combine=combine)
  assert options["hard_step"] > options["anneal_steps"]  # tau = tau_min.
  num_tokens = 4096
  x_TD = jax.random.normal(jax.random.key(0), (num_tokens, d_model))
  variables = router.init(jax.random.key(1), x_TD)
  step = jnp.int32(options["hard_step"])
  train = router.apply(variables, x_TD, deterministic=False, step=step,
                       rngs={"router": jax.random.key(2)})
  ev = router.apply(variables, x_TD)
  pick = lambda r: np.asarray(r.weight_TK)[np.asarray(r.mask_TK)]  # noqa: E731
  w_train, w_eval = pick(train), pick(ev)
  assert w_train.shape == w_eval.shape == (num_tokens,)  # One expert each.
  noise = 4 * np.sqrt(w_train.var() / num_tokens + w_eval.var() / num_tokens)
  probs_TE = np.asarray(_probs(variables, x_TD))
  if combine == "softmax":
    np.testing.assert_allclose(w_train, probs_TE[np.asarray(train.mask_TK)],
                               rtol=1e-6)
    np.testing.assert_allclose(w_eval, probs_TE.max(-1), rtol=1e-6)
    expected = (probs_TE**2).sum(-1).mean()  # E_a~p [p_a] per token.
    assert abs(w_train.mean() - expected) < 4 * np.sqrt(w_train.var() /
                                                         num_tokens)
  else:
    assert abs(w_train.mean() - w_eval.mean()) < noise, (w_train.mean(),
                                                          w_eval.mean())


def test_preset_is_the_authors_command_and_goes_dense_to_sparse():
  """The evomoe preset: no gate loss (the authors' DTS scripts), linear decay
  (their balanced script), and a soft phase whose tokens go from nearly all
  experts to about one as tau anneals (at init, the gate is near uniform: the
  noise alone decides how many samples pass the threshold)."""
  router, options, d_model = _preset_router()
  assert (options["aux_loss_coef"], options["schedule"]) == (0.0, "linear")
  x_TD = jax.random.normal(jax.random.key(0), (2048, d_model))
  variables = router.init(jax.random.key(1), x_TD)
  used = [float(router.apply(variables, x_TD, deterministic=False,
                             step=jnp.int32(step), rngs={"router": jax.random.key(2)}
                             ).metrics["experts_per_token"])
          for step in (0, options["anneal_steps"] // 2, options["anneal_steps"])]
  assert used[0] > 7.5 and used[0] > used[1] > used[2], used
  assert used[2] < 2.0, used  # tau_min 0.1; the code's 0.5 leaves ~6.4.
