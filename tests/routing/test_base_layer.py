"""BASE layers: the auction against scipy's exact assignment, greedy eval, gradients."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from moejax.errors import ConfigError
from moejax.moe import MoELayer
from moejax.routing import balanced_assignment, make_router

D = 8


def _optimum(scores_TE: np.ndarray) -> float:
  """Exact optimum: every expert repeated T/E times, then a square assignment."""
  num_tokens, num_experts = scores_TE.shape
  cost = np.repeat(scores_TE, num_tokens // num_experts, axis=1)
  rows, cols = linear_sum_assignment(cost, maximize=True)
  return float(cost[rows, cols].sum())


def _check_balanced_and_near_optimal(scores_TE, expert_T, eps):
  num_tokens, num_experts = scores_TE.shape
  expert_T = np.asarray(expert_T)
  np.testing.assert_array_equal(np.bincount(expert_T, minlength=num_experts),
                                [num_tokens // num_experts] * num_experts)
  total = float(scores_TE[np.arange(num_tokens), expert_T].sum())
  gap = _optimum(scores_TE) - total
  assert -1e-4 <= gap <= num_tokens * float(eps) + 1e-4, (gap, eps)


@pytest.mark.parametrize("num_tokens,num_experts", [(16, 4), (24, 3)])
def test_auction_is_balanced_and_within_bound(num_tokens, num_experts):
  solve = jax.jit(balanced_assignment)
  for seed in range(4):
    scores_TE = np.random.default_rng(seed).normal(
        size=(num_tokens, num_experts)).astype(np.float32)
    # Tokens that all prefer expert 0 force the auction to move most of them.
    scores_TE[:, 0] += 2.0 * (seed % 2)
    expert_T, stats = solve(jnp.asarray(scores_TE))
    assert float(stats["unfinished"]) == 0.0
    _check_balanced_and_near_optimal(scores_TE, expert_T, stats["eps"])


def test_tighter_eps_and_fallback():
  scores_TE = np.random.default_rng(7).normal(size=(24, 3)).astype(np.float32)
  expert_T, stats = balanced_assignment(jnp.asarray(scores_TE), eps_ratio=1e-3)
  _check_balanced_and_near_optimal(scores_TE, expert_T, stats["eps"])
  # Out of rounds: balance still holds, and so does the bound, at the eps of
  # the last finished phase (here none finished: eps = R bounds anything).
  expert_T, stats = balanced_assignment(jnp.asarray(scores_TE), max_rounds=1)
  assert float(stats["unfinished"]) > 0
  assert float(stats["eps"]) > float(stats["eps_target"])
  _check_balanced_and_near_optimal(scores_TE, expert_T, stats["eps"])


def _one_direction(num_tokens, num_experts, d_model, noise, scale, seed=0):
  """Affinities of hidden states that share one direction (plus `noise`),
  against orthogonal expert embeddings of gain 0.1, as BASE initialises them:
  every token prefers the same expert, by nearly the same margins."""
  rng = np.random.default_rng(seed)
  u_D = rng.normal(size=d_model)
  u_D /= np.linalg.norm(u_D)
  x_TD = scale * (u_D + noise * rng.normal(size=(num_tokens, d_model)))
  q_DE, _ = np.linalg.qr(rng.normal(size=(d_model, num_experts)))
  return (x_TD @ (0.1 * q_DE)).astype(np.float32)


@pytest.mark.parametrize("num_tokens,num_experts,d_model,noise", [
    (512, 4, 16, 0.01),  # A per-copy-price auction ran out of 1000 rounds here.
    (512, 4, 128, 0.0),  # Identical tokens: every balanced assignment is optimal.
    (2048, 8, 128, 0.0)])
def test_tokens_sharing_one_direction_finish_within_the_bound(
    num_tokens, num_experts, d_model, noise):
  scores_TE = _one_direction(num_tokens, num_experts, d_model, noise, 10.0)
  solve = jax.jit(balanced_assignment)
  expert_T, stats = solve(jnp.asarray(scores_TE))
  assert float(stats["unfinished"]) == 0.0
  assert float(stats["rounds"]) < 200  # Of max_rounds = 1000.
  assert float(stats["eps"]) == float(stats["eps_target"])
  _check_balanced_and_near_optimal(scores_TE, expert_T, stats["eps"])


@pytest.mark.parametrize("eps_scaling", [1.0, 8.0])
def test_bound_holds_at_the_reported_eps_however_few_the_rounds(eps_scaling):
  """Whatever max_rounds allows, the assignment is balanced and within
  T * stats["eps"] of scipy's optimum; eps is the target once finished."""
  cases = [_one_direction(512, 4, 16, 0.01, 10.0),
           np.random.default_rng(3).normal(size=(64, 4)).astype(np.float32)]
  # max_rounds as a traced value: one compiled program per case.
  solve = jax.jit(lambda s, r: balanced_assignment(s, max_rounds=r,
                                                   eps_scaling=eps_scaling))
  for scores_TE in cases:
    for max_rounds in (1, 2, 5, 20, 1000):
      expert_T, stats = solve(jnp.asarray(scores_TE), jnp.int32(max_rounds))
      _check_balanced_and_near_optimal(scores_TE, expert_T, stats["eps"])
      if float(stats["unfinished"]) == 0.0:
        assert float(stats["eps"]) == float(stats["eps_target"])
    assert float(stats["unfinished"]) == 0.0  # 1000 rounds are enough.


@pytest.mark.parametrize("num_tokens,num_experts", [(16, 4), (24, 3)])
def test_router_trains_balanced_and_evaluates_greedy(num_tokens, num_experts):
  router = make_router("base", num_experts=num_experts)
  x_TD = jax.random.normal(jax.random.key(0), (num_tokens, D))
  variables = jax.jit(router.init)(jax.random.key(1), x_TD)
  apply = jax.jit(router.apply, static_argnames="deterministic")
  w_ED = variables["params"]["expert_embeddings"].value
  scores_TE = np.asarray(x_TD @ w_ED.T)
  train = apply(variables, x_TD, deterministic=False)
  _check_balanced_and_near_optimal(scores_TE, train.expert_TK[:, 0],
                                   train.metrics["auction_eps"])
  assert train.slots.per_expert == num_tokens // num_experts
  score_T = scores_TE[np.arange(num_tokens), np.asarray(train.expert_TK[:, 0])]
  np.testing.assert_allclose(train.weight_TK[:, 0], jax.nn.sigmoid(score_T),
                             rtol=1e-6)
  assert float(train.aux_loss) == 0.0
  evaluation = apply(variables, x_TD)
  np.testing.assert_array_equal(evaluation.expert_TK[:, 0],
                                scores_TE.argmax(axis=1))
  assert evaluation.slots.per_expert is None


def test_gradient_reaches_expert_embeddings_through_the_gate():
  router = make_router("base", num_experts=4)
  x_TD = jax.random.normal(jax.random.key(2), (16, D))
  params = nn.unbox(jax.jit(router.init)(jax.random.key(3), x_TD))["params"]

  def loss(p):
    routing = router.apply({"params": p}, x_TD, deterministic=False)
    return jnp.sum(routing.weight_TK)

  grad_ED = jax.jit(jax.grad(loss))(params)["expert_embeddings"]
  assert np.all(np.isfinite(grad_ED))
  # Each expert serves 4 tokens, so every row of the gradient is non-zero.
  assert np.all(np.abs(np.asarray(grad_ED)).sum(axis=1) > 0)


def test_unbalanced_token_count_errors_or_pads():
  x_TD = jax.random.normal(jax.random.key(4), (10, D))
  router = make_router("base", num_experts=4)
  variables = jax.jit(router.init)(jax.random.key(5), x_TD)  # Eval: any T.
  with pytest.raises(ConfigError, match="T=10 divisible by model.num_experts=4"
                     ".*pad_unbalanced=True"):
    router.apply(variables, x_TD, deterministic=False)
  padded = make_router("base", num_experts=4, options={"pad_unbalanced": True})
  routing = jax.jit(functools.partial(padded.apply, deterministic=False))(
      variables, x_TD)
  expert_T = np.asarray(routing.expert_TK[:, 0])
  np.testing.assert_array_equal(np.bincount(expert_T[:8], minlength=4), [2] * 4)
  scores_TE = np.asarray(x_TD @ variables["params"]["expert_embeddings"].value.T)
  np.testing.assert_array_equal(expert_T[8:], scores_TE[8:].argmax(axis=1))
  assert routing.slots.per_expert == 2 + 2


def test_capacity_path_drops_nothing_in_training():
  # The layer's capacity factor 0.5 alone would give C = 2; the router's T/E wins.
  layer = MoELayer("base", num_experts=4, d_ff=16, dispatch="capacity",
                   capacity_factor=0.5)
  x_BLD = jax.random.normal(jax.random.key(6), (2, 8, D))
  variables = jax.jit(layer.init)(jax.random.key(7), x_BLD)
  apply = jax.jit(functools.partial(layer.apply, deterministic=False))
  y_BLD, aux = apply(variables, x_BLD)
  assert np.all(np.isfinite(y_BLD))
  assert float(aux.metrics["drop_frac"]) == 0.0
  assert float(aux.metrics["load_max_over_mean"]) == pytest.approx(1.0)


def test_base_is_top1():
  with pytest.raises(ConfigError, match="router 'base' sends each token to one expert"):
    make_router("base", num_experts=4, top_k=2)
