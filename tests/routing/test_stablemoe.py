"""StableMoE routing: the balance loss by hand, greedy vs distilled routing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.errors import ConfigError
from moejax.routing import make_router
from moejax.routing.stablemoe import stablemoe_balance_loss

sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731


def test_balance_loss_equals_hand_computation():
  # Scores of 4 tokens on 2 experts; greedy argmax sends tokens 0-2 to expert 0,
  # token 3 to expert 1: |A| = [3, 1], n̄ = 4/2 = 2, ratios [(3-2)/2, (1-2)/2] =
  # [0.5, -0.5]. Loss = (0.5*(s(1) + s(2) + s(0.5)) - 0.5*s(1)) / 4
  #                  = 0.5 * (s(2) + s(0.5)) / 4, s = sigmoid.
  scores = jnp.array([[1.0, 0.0], [2.0, 0.0], [0.5, 0.0], [0.0, 1.0]])
  expert = jnp.argmax(scores, -1)
  want = 0.5 * (sigmoid(2.0) + sigmoid(0.5)) / 4
  np.testing.assert_allclose(stablemoe_balance_loss(scores, expert), want,
                             rtol=1e-6)
  # Gradient only through sigma: overloaded expert 0's scores are pushed down.
  grad = jax.grad(lambda s: stablemoe_balance_loss(s, expert))(scores)
  assert (np.asarray(grad)[:3, 0] > 0).all() and np.asarray(grad)[3, 1] < 0


def _router(stage):
  return make_router("stablemoe", num_experts=2, vocab_size=5,
                     options={"stage": stage, "distill_dim": 3})


def _params():
  # Centroids pick expert by the sign of x[0]; the distilled router by token id.
  return {"centroids": jnp.array([[1.0, -1.0], [0.0, 0.0]]),
          "distill_embedding": jnp.array([[1.0, 0, 0]] * 3 + [[0, 1.0, 0]] * 2),
          "distill_centroids": jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])}


X = jnp.array([[2.0, 1.0], [-2.0, 1.0], [3.0, 0.0], [-1.0, 0.5]])
IDS = jnp.array([4, 0, 1, 3])  # Distilled routes: 1, 0, 0, 1.


def test_stage1_training_routes_greedily_and_distills():
  r = _router(1).apply({"params": _params()}, X, token_ids_T=IDS,
                       deterministic=False)
  np.testing.assert_array_equal(r.expert_TK[:, 0], [0, 1, 0, 1])
  # Gate sigma(e_a . h): scores of the chosen experts are 2, 2, 3, 1.
  np.testing.assert_allclose(r.weight_TK[:, 0], sigmoid(np.array([2, 2, 3, 1.0])),
                             rtol=1e-6)
  assert float(r.metrics["distill_loss"]) > 0 and float(r.aux_loss) > 0
  np.testing.assert_allclose(r.metrics["distill_agreement"], 0.5)


@pytest.mark.parametrize("stage,deterministic", [(1, True), (2, False), (2, True)])
def test_distilled_router_routes_in_stage2_and_at_evaluation(stage, deterministic):
  r = _router(stage).apply({"params": _params()}, X, token_ids_T=IDS,
                           deterministic=deterministic)
  np.testing.assert_array_equal(r.expert_TK[:, 0], [1, 0, 0, 1])
  # The gate still reads the backbone centroids: scores -2, -2, 3, 1.
  np.testing.assert_allclose(r.weight_TK[:, 0],
                             sigmoid(np.array([-2, -2, 3, 1.0])), rtol=1e-6)
  assert float(r.aux_loss) == 0.0


def test_needs_token_ids_and_top1():
  with pytest.raises(ConfigError, match="needs token ids"):
    make_router("stablemoe", num_experts=2).apply({"params": _params()}, X)
  with pytest.raises(ConfigError, match="sends each token to one expert"):
    make_router("stablemoe", num_experts=4, top_k=2, vocab_size=5)
