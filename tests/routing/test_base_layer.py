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
  # Out of rounds: the leftovers fill free copies, so balance still holds.
  expert_T, stats = balanced_assignment(jnp.asarray(scores_TE), max_rounds=1)
  assert float(stats["unfinished"]) > 0
  np.testing.assert_array_equal(np.bincount(np.asarray(expert_T), minlength=3),
                                [8, 8, 8])


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
  assert train.capacity == num_tokens // num_experts
  score_T = scores_TE[np.arange(num_tokens), np.asarray(train.expert_TK[:, 0])]
  np.testing.assert_allclose(train.weight_TK[:, 0], jax.nn.sigmoid(score_T),
                             rtol=1e-6)
  assert float(train.aux_loss) == 0.0
  evaluation = apply(variables, x_TD)
  np.testing.assert_array_equal(evaluation.expert_TK[:, 0],
                                scores_TE.argmax(axis=1))
  assert evaluation.capacity is None


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
  assert routing.capacity == 2 + 2


def test_capacity_path_drops_nothing_in_training():
  # The layer's capacity factor 0.5 alone would give C = 2; the router's T/E wins.
  layer = MoELayer(make_router("base", num_experts=4), num_experts=4, d_ff=16,
                   dispatch="capacity", capacity_factor=0.5)
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
