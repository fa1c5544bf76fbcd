"""Every dispatch path against the naive per-token loop, values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe import dispatch
from moejax.moe.experts import Experts, capacity_ffn, grouped_ffn
from moejax.moe.reference import capacity_keep_loop, moe_loop

T, D, F, E = 24, 8, 16, 4


def _problem(seed: int, top_k: int, mask_prob: float = 0.1):
  rng = np.random.default_rng(seed)
  x_TD = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
  # Distinct experts per token, skewed so that some experts overflow.
  expert_TK = np.stack([rng.choice(E, size=top_k, replace=False,
                                   p=[0.55, 0.25, 0.15, 0.05]) for _ in range(T)])
  weight_TK = jnp.asarray(rng.uniform(0.1, 1.0, size=(T, top_k)), jnp.float32)
  mask_TK = rng.uniform(size=(T, top_k)) > mask_prob
  params = nn.unbox(Experts(E, D, F).init(jax.random.key(seed)))
  return x_TD, jnp.asarray(expert_TK, jnp.int32), weight_TK, jnp.asarray(mask_TK), params


def _run(path, params, x_TD, expert_TK, weight_TK, mask_TK, capacity=None):
  w_in_EDF, w_out_EFD = Experts(E, D, F).apply(params)
  if path == "capacity":
    plan = dispatch.plan_capacity(expert_TK, mask_TK, E, capacity)
    y_ECD = capacity_ffn(dispatch.dispatch_capacity(x_TD, plan), w_in_EDF,
                         w_out_EFD)
    return dispatch.combine_capacity(y_ECD, plan, weight_TK)
  plan = dispatch.plan_dropless(expert_TK, mask_TK, E)
  y_MD = grouped_ffn(dispatch.dispatch_sorted(x_TD, plan), w_in_EDF, w_out_EFD,
                     plan.group_sizes_E)
  return dispatch.combine_sorted(y_MD, plan, weight_TK, mask_TK)


CASES = [  # (path, top_k, capacity); capacity None = dropless.
    ("dropless", 1, None), ("dropless", 2, None),
    ("capacity", 1, T), ("capacity", 2, 2 * T),  # Large enough: nothing dropped.
    ("capacity", 1, 4), ("capacity", 2, 5),  # Small: over-capacity slots dropped.
]


@pytest.mark.parametrize("path,top_k,capacity", CASES)
def test_dispatch_matches_naive_loop(path, top_k, capacity):
  x_TD, expert_TK, weight_TK, mask_TK, params = _problem(top_k + 7, top_k)
  kept_TK = capacity_keep_loop(expert_TK, mask_TK, E, capacity)
  if capacity is not None and capacity < T:
    assert not kept_TK[np.asarray(mask_TK)].all()  # The case really drops.

  def fast(x, w, p):
    return _run(path, p, x, expert_TK, w, mask_TK, capacity)

  def naive(x, w, p):
    return moe_loop(x, expert_TK, w, kept_TK, p["params"]["w_in"],
                    p["params"]["w_out"])

  np.testing.assert_allclose(fast(x_TD, weight_TK, params),
                             naive(x_TD, weight_TK, params), rtol=1e-5, atol=1e-5)
  cotangent = jnp.asarray(np.random.default_rng(0).normal(size=(T, D)), jnp.float32)
  loss = lambda f: lambda *a: jnp.sum(f(*a) * cotangent)
  g_fast = jax.grad(loss(fast), argnums=(0, 1, 2))(x_TD, weight_TK, params)
  g_naive = jax.grad(loss(naive), argnums=(0, 1, 2))(x_TD, weight_TK, params)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_naive)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("top_k,capacity", [(1, 3), (2, 4), (2, 1)])
def test_capacity_drops_exactly_the_over_capacity_slots(top_k, capacity):
  x_TD, expert_TK, weight_TK, mask_TK, params = _problem(3, top_k, mask_prob=0.0)
  plan = dispatch.plan_capacity(expert_TK, mask_TK, E, capacity)
  expected = capacity_keep_loop(expert_TK, mask_TK, E, capacity)
  np.testing.assert_array_equal(plan.kept_TK, expected)
  # Each expert keeps min(routed, C) slots: the drops are exactly the overflow.
  routed_E = np.bincount(np.asarray(expert_TK).ravel(), minlength=E)
  kept_E = np.bincount(np.asarray(expert_TK)[np.asarray(plan.kept_TK)], minlength=E)
  np.testing.assert_array_equal(kept_E, np.minimum(routed_E, capacity))
  # A token with no kept slot gets exactly zero from the MoE layer.
  y_TD = _run("capacity", params, x_TD, expert_TK, weight_TK, mask_TK, capacity)
  fully_dropped = ~np.asarray(plan.kept_TK).any(axis=1)
  assert fully_dropped.any()
  np.testing.assert_array_equal(np.asarray(y_TD)[fully_dropped], 0.0)


def test_capacity_buffers_hold_the_right_tokens():
  x_TD, expert_TK, _, mask_TK, _ = _problem(5, 2)
  plan = dispatch.plan_capacity(expert_TK, mask_TK, E, 6)
  x_ECD = dispatch.dispatch_capacity(x_TD, plan)
  token_EC = np.asarray(plan.token_EC)
  for e in range(E):
    for c in range(6):
      t = token_EC[e, c]
      expected = np.zeros(D) if t == T else np.asarray(x_TD[t])
      np.testing.assert_array_equal(x_ECD[e, c], expected)
      if t < T:  # The token really chose expert e in a kept slot.
        assert e in np.asarray(expert_TK)[t][np.asarray(plan.kept_TK)[t]]


def test_expert_capacity_formula():
  # ceil(1.25 * 16 * 2 / 8) = ceil(5.0) = 5; ceil(1.0 * 10 / 4) = 3.
  assert dispatch.expert_capacity(16, 8, 2, 1.25) == 5
  assert dispatch.expert_capacity(10, 4, 1, 1.0) == 3
  assert dispatch.expert_capacity(1, 64, 1, 0.1) == 1


def test_dropless_group_sizes_count_used_slots():
  _, expert_TK, _, mask_TK, _ = _problem(11, 2, mask_prob=0.3)
  plan = dispatch.plan_dropless(expert_TK, mask_TK, E)
  expected = np.bincount(np.asarray(expert_TK)[np.asarray(mask_TK)], minlength=E)
  np.testing.assert_array_equal(plan.group_sizes_E, expected)
  # Sorted rows are grouped by expert in order.
  sorted_experts = np.asarray(expert_TK).ravel()[
      np.argsort(np.asarray(plan.inverse_TK).ravel())]
  used = int(expected.sum())
  assert list(sorted_experts[:used]) == sorted(sorted_experts[:used])


@pytest.mark.parametrize("rows", [7, 12, 40])
def test_dropless_plan_for_fewer_rows_than_slots(rows):
  """rows < T*K sorts only the used slots; with rows >= the used slots it is
  the full plan's first rows, and dispatch -> experts -> combine is the loop."""
  x_TD, expert_TK, weight_TK, _, params = _problem(7, 2)
  rng = np.random.default_rng(1)
  mask_TK = jnp.asarray(rng.uniform(size=(T, 2)) < 0.2)  # 7 of 48 slots used.
  used = int(mask_TK.sum())
  assert used == 7 and rows < T * 2
  full = dispatch.plan_dropless(expert_TK, mask_TK, E)
  small = dispatch.plan_dropless(expert_TK, mask_TK, E, rows)
  np.testing.assert_array_equal(small.group_sizes_E, full.group_sizes_E)
  np.testing.assert_array_equal(small.source_M[:used], full.source_M[:used])
  np.testing.assert_array_equal(small.token_M[:used], full.token_M[:used])
  np.testing.assert_array_equal(small.kept_TK, mask_TK)
  # Empty rows carry source T*K (weight 0) and a valid token.
  assert np.all(np.asarray(small.source_M[used:]) == T * 2)
  assert np.all(np.asarray(small.token_M) < T)

  def fast(x, w, p):
    y_MD = grouped_ffn(dispatch.dispatch_sorted(x, small),
                       p["params"]["w_in"], p["params"]["w_out"],
                       small.group_sizes_E)
    return dispatch.combine_sorted(y_MD, small, w, mask_TK)

  kept_TK = capacity_keep_loop(expert_TK, mask_TK, E, None)
  y_loop = moe_loop(x_TD, expert_TK, weight_TK, kept_TK,
                    params["params"]["w_in"], params["params"]["w_out"])
  np.testing.assert_allclose(fast(x_TD, weight_TK, params), y_loop, rtol=1e-5,
                             atol=1e-5)
  # Too few rows: the used slots without a row are exactly the not-kept ones,
  # and the output is the loop over the kept ones.
  tight = dispatch.plan_dropless(expert_TK, mask_TK, E, 5)
  kept = np.asarray(tight.kept_TK)
  assert kept.sum() == 5 and not np.any(kept & ~np.asarray(mask_TK))
