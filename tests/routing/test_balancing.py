"""Balancing policies: each loss by hand, the bias rule, and exactness on a mesh."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.errors import ConfigError
from moejax.moe import MoELayer
from moejax.parallel import MeshConfig, make_mesh
from moejax.routing import (ROUTER_STATE, TokenLayout, make_router, parse_policy,
                            update_bias)
from moejax.routing.balancing import BalancePolicy

# Gate W = [[ln 3, 0], [0, ln 3]]: x = [1, 0] -> p = [0.75, 0.25] (expert 0),
# x = [0, 1] -> p = [0.25, 0.75] (expert 1). Two sequences of two tokens:
# sequence 0 = (e0, e0), sequence 1 = (e1, e0).
GATE = jnp.array([[math.log(3), 0.0], [0.0, math.log(3)]])
X_TD = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
LAYOUT = TokenLayout(batch=2, length=2)


def _route(options, layout=LAYOUT, state=None, **kw):
  router = make_router("switch", num_experts=2,
                       options={"z_loss_coef": 0.0, **options})
  variables = {"params": {"gate": {"kernel": GATE}}, **(state or {})}
  return router.apply(variables, X_TD, layout=layout, **kw)


def test_parse_policy():
  assert parse_policy("aux") == BalancePolicy("aux", False)
  assert parse_policy("bias+sequence") == BalancePolicy("sequence", True)
  assert parse_policy("bias") == BalancePolicy(None, True)
  assert parse_policy("none") == BalancePolicy(None, False)
  for bad in ("aux+global", "bias+nope", "", "none+bias"):
    with pytest.raises(ConfigError, match="is not a policy"):
      parse_policy(bad)


@pytest.mark.parametrize("options,layout,expected", [
    # global: f = [3/4, 1/4], P = [(3*0.75 + 0.25)/4, (3*0.25 + 0.75)/4]
    # = [0.625, 0.375]; E * sum f P = 2 * (0.46875 + 0.09375) = 1.125.
    ({"balance": "global"}, LAYOUT, 1.125),
    # sequence 0: f = [1, 0], P = [0.75, 0.25] -> 2 * 0.75 = 1.5;
    # sequence 1: f = [1/2, 1/2], P = [0.5, 0.5] -> 2 * 0.5 = 1.0; mean 1.25.
    ({"balance": "sequence"}, LAYOUT, 1.25),
    # Two micro-batches of one sequence each: the sequence numbers again.
    ({"balance": "aux", "micro_batches": 2}, LAYOUT, 1.25),
    # Default: one micro-batch per device splitting the batch.
    ({"balance": "aux"}, TokenLayout(2, 2, shards=2), 1.25),
    ({"balance": "aux"}, TokenLayout(2, 2, shards=1), 1.125),
])
def test_balance_losses_by_hand(options, layout, expected):
  routing = _route({"aux_loss_coef": 0.1, **options}, layout)
  np.testing.assert_allclose(routing.metrics["balance_loss"], expected, rtol=1e-6)
  np.testing.assert_allclose(routing.aux_loss, 0.1 * expected, rtol=1e-6)


def test_micro_batches_must_divide_the_batch_in_training_only():
  with pytest.raises(ConfigError, match="2 sequences does not split into 3"):
    _route({"micro_batches": 3}, deterministic=False)
  # Evaluation and decoding only report the loss: one group, the global value.
  routing = _route({"micro_batches": 3, "aux_loss_coef": 0.1})
  np.testing.assert_allclose(routing.metrics["balance_loss"], 1.125, rtol=1e-6)
  np.testing.assert_allclose(routing.aux_loss, 0.1125, rtol=1e-6)
  # A batch they split keeps the micro-batch value outside training too.
  routing = _route({"micro_batches": 2})
  np.testing.assert_allclose(routing.metrics["balance_loss"], 1.25, rtol=1e-6)


def test_no_loss_policies_add_nothing_but_report_the_global_value():
  routing = _route({"balance": "none"})
  assert float(routing.aux_loss) == 0.0
  np.testing.assert_allclose(routing.metrics["balance_loss"], 1.125, rtol=1e-6)


def test_update_bias_by_hand():
  # counts [3, 1, 0, 0], mean 1: sign(mean - c) = [-1, 0, 1, 1]; times u = 0.1
  # -> [-0.1, 0, 0.1, 0.1], mean 0.025 -> recentred [-0.125, -0.025, 0.075, 0.075].
  counts_E = jnp.array([3.0, 1.0, 0.0, 0.0])
  np.testing.assert_allclose(update_bias(jnp.zeros(4), counts_E, 0.1, False),
                             [-0.1, 0.0, 0.1, 0.1], atol=1e-7)
  np.testing.assert_allclose(update_bias(jnp.zeros(4), counts_E, 0.1, True),
                             [-0.125, -0.025, 0.075, 0.075], atol=1e-7)


def test_bias_chooses_experts_but_not_gates_and_steps_in_training():
  options = {"balance": "bias", "bias_rate": 0.01}
  # b = [0, 0.6]: token [1, 0] scores [0.75, 0.25] + b = [0.75, 0.85] -> expert
  # 1, gate 0.25 (its score, without b); tokens [0, 1] -> [0.25, 1.35] -> 1.
  state = {ROUTER_STATE: {"balance": {"expert_bias": jnp.array([0.0, 0.6])}}}
  routing = _route(options, state=state)
  np.testing.assert_array_equal(routing.expert_TK[:, 0], [1, 1, 1, 1])
  np.testing.assert_allclose(routing.weight_TK[:, 0], [0.25, 0.25, 0.75, 0.25],
                             rtol=1e-6)
  assert float(routing.aux_loss) == 0.0
  np.testing.assert_allclose(routing.metrics["expert_bias_range"], 0.6, rtol=1e-6)
  # Evaluation, or a collection that is not mutable: the bias stays.
  _, same = _route(options, state=state, mutable=[ROUTER_STATE])
  np.testing.assert_array_equal(
      same[ROUTER_STATE]["balance"]["expert_bias"],
      state[ROUTER_STATE]["balance"]["expert_bias"])
  # Training: counts [0, 4], mean 2 -> b + 0.01 * [1, -1] = [0.01, 0.59],
  # recentred (mean 0.3) -> [-0.29, 0.29].
  _, new = _route(options, state=state, mutable=[ROUTER_STATE],
                  deterministic=False)
  np.testing.assert_allclose(new[ROUTER_STATE]["balance"]["expert_bias"],
                             [-0.29, 0.29], rtol=1e-6)


def test_sigmoid_top2_normalised_and_scaled():
  # logits [ln 3, 0, -ln 3] -> sigmoid [0.75, 0.5, 0.25]; top-2 = experts 0, 1;
  # gates [0.75, 0.5] / 1.25 = [0.6, 0.4], times 2.5 = [1.5, 1.0]. The balance
  # loss reads s / sum(s) = [0.5, 1/3, 1/6]: f = [1/2, 1/2, 0] ->
  # 3 * (0.25 + 1/6) = 1.25.
  router = make_router("topk", num_experts=3, top_k=2, options={
      "score": "sigmoid", "routed_scaling": 2.5, "balance": "global",
      "aux_loss_coef": 1.0, "z_loss_coef": 0.0})
  x_TD = jnp.array([[math.log(3), 0.0, -math.log(3)]])
  routing = router.apply({"params": {"gate": {"kernel": jnp.eye(3)}}}, x_TD)
  np.testing.assert_array_equal(routing.expert_TK, [[0, 1]])
  np.testing.assert_allclose(routing.weight_TK, [[1.5, 1.0]], rtol=1e-6)
  np.testing.assert_allclose(routing.aux_loss, 1.25, rtol=1e-6)
  unnormalised = make_router("topk", num_experts=3, top_k=2, options={
      "score": "sigmoid", "renormalize": False})
  routing = unnormalised.apply({"params": {"gate": {"kernel": jnp.eye(3)}}}, x_TD)
  np.testing.assert_allclose(routing.weight_TK, [[0.75, 0.5]], rtol=1e-6)


def test_group_limited_routing_picks_within_the_best_groups():
  # Scores [0.1, 0.2 | 0.9, 0.05]: group scores (sum of the top two) 0.3 and
  # 0.95; one group allowed -> experts 2 and 3, although 1 outscores 3.
  logits = jnp.log(jnp.array([[0.1, 0.2, 0.9, 0.05]]))  # softmax keeps ratios.
  options = {"num_groups": 2, "top_groups": 1}
  router = make_router("topk", num_experts=4, top_k=2, options=options)
  routing = router.apply({"params": {"gate": {"kernel": jnp.eye(4)}}}, logits)
  np.testing.assert_array_equal(routing.expert_TK, [[2, 3]])
  free = make_router("topk", num_experts=4, top_k=2)
  routing = free.apply({"params": {"gate": {"kernel": jnp.eye(4)}}}, logits)
  np.testing.assert_array_equal(routing.expert_TK, [[2, 1]])


@pytest.mark.parametrize("options,match", [
    ({"score": "relu"}, "score='relu'"),
    ({"balance": "aux+global"}, "is not a policy"),
    ({"num_groups": 3, "top_groups": 1}, "num_groups dividing 4"),
    ({"num_groups": 2, "top_groups": 1}, "top_k=3 exceeds the 1 groups x 2"),
    ({"bias_rate": -1.0}, "bias_rate >= 0"),
])
def test_bad_options_are_config_errors(options, match):
  with pytest.raises(ConfigError, match=match):
    make_router("topk", num_experts=4, top_k=3, options=options)


B, L, D, F, E = 16, 4, 8, 16, 8  # 64 tokens, 8 per device on the mesh.


@pytest.mark.parametrize("balance,ref_options", [
    ("global", {}), ("sequence", {}),
    # aux on the mesh: one micro-batch per device (8); one device: 8 groups.
    ("aux", {"micro_batches": 8})])
def test_losses_are_exact_on_an_8_device_mesh(balance, ref_options):
  mesh = make_mesh(MeshConfig(2, 4), num_experts=E)
  x_BLD = jax.random.normal(jax.random.key(1), (B, L, D))

  def layer(options, mesh=None):
    return MoELayer("topk", num_experts=E, d_ff=F, top_k=2, dispatch="dropless",
                    router_options={"balance": balance, **options}, mesh=mesh)

  variables = nn.unbox(layer({}).init(jax.random.key(0), x_BLD))

  def loss_and_grad(layer):
    def aux_loss(v):
      return layer.apply(v, x_BLD)[1].aux_loss
    return jax.jit(jax.value_and_grad(aux_loss))(variables)

  (l_mesh, g_mesh), (l_one, g_one) = (loss_and_grad(layer({}, mesh)),
                                      loss_and_grad(layer(ref_options)))
  np.testing.assert_allclose(l_mesh, l_one, rtol=1e-6)
  np.testing.assert_allclose(g_mesh["params"]["router"]["gate"]["kernel"],
                             g_one["params"]["router"]["gate"]["kernel"],
                             rtol=1e-5, atol=1e-8)
  if balance == "aux":
    # What each device would compute alone on its 2 sequences, averaged.
    shards = x_BLD.reshape(8, B // 8, L, D)
    per_device = [layer({"balance": "global"}).apply(variables, s)[1].aux_loss
                  for s in shards]
    np.testing.assert_allclose(l_mesh, np.mean(per_device), rtol=1e-5)


def test_sequence_loss_counts_the_unbiased_top_k():
  # b = [0, 0.6] routes every token to expert 1, but f_i of the sequence loss
  # counts the top-1 of the unbiased scores (DeepSeek-V3 eq. 18, Megatron-core):
  # sequences (e0, e0) and (e1, e0) -> 1.25 as without a bias (by hand above),
  # not 2 * mean(P_1) over all-e1 sequences = 2 * (0.25 + 0.5) / 2 = 0.75.
  options = {"balance": "bias+sequence", "aux_loss_coef": 1.0}
  state = {ROUTER_STATE: {"balance": {"expert_bias": jnp.array([0.0, 0.6])}}}
  biased = _route(options, state=state)
  unbiased = _route({"balance": "sequence", "aux_loss_coef": 1.0})
  np.testing.assert_array_equal(biased.expert_TK[:, 0], [1, 1, 1, 1])
  np.testing.assert_array_equal(unbiased.expert_TK[:, 0], [0, 0, 1, 0])
  np.testing.assert_allclose(biased.aux_loss, 1.25, rtol=1e-6)
  np.testing.assert_allclose(unbiased.aux_loss, 1.25, rtol=1e-6)
  # The gradients of the loss agree too; the bias still steps from the routed
  # slots: counts [0, 4], u = 1e-3 -> [0.001, 0.599], recentred [-0.299, 0.299].
  router = make_router("switch", num_experts=2, options={"z_loss_coef": 0.0,
                                                          **options})
  grad = lambda s: jax.grad(lambda w: router.apply(  # noqa: E731
      {"params": {"gate": {"kernel": w}}, **s}, X_TD, layout=LAYOUT).aux_loss)(GATE)
  zero = {ROUTER_STATE: {"balance": {"expert_bias": jnp.zeros(2)}}}
  np.testing.assert_allclose(grad(state), grad(zero), rtol=1e-6)
  _, new = _route(options, state=state, mutable=[ROUTER_STATE],
                  deterministic=False)
  np.testing.assert_allclose(new[ROUTER_STATE]["balance"]["expert_bias"],
                             [-0.299, 0.299], rtol=1e-6)


def _group_route(probs, top_k, top_groups, bias=None, **options):
  num_experts = len(probs)
  router = make_router("topk", num_experts=num_experts, top_k=top_k, options={
      "num_groups": num_experts // GROUP_SIZE[num_experts],
      "top_groups": top_groups, "balance": "bias" if bias is not None else "aux",
      **options})
  state = {} if bias is None else {
      ROUTER_STATE: {"balance": {"expert_bias": jnp.asarray(bias, jnp.float32)}}}
  logits = jnp.log(jnp.array([probs]))  # softmax(log p) = p.
  routing = router.apply({"params": {"gate": {"kernel": jnp.eye(num_experts)}},
                          **state}, logits)
  return sorted(np.asarray(routing.expert_TK[0]).tolist())


GROUP_SIZE = {6: 3, 8: 2}
# Two groups of three: [0.40, 0.02, 0.02 | 0.20, 0.18, 0.18].
SIX = [0.40, 0.02, 0.02, 0.20, 0.18, 0.18]
# Four groups of two: [0.25, 0.01 | 0.15, 0.14 | 0.20, 0.01 | 0.12, 0.12].
EIGHT = [0.25, 0.01, 0.15, 0.14, 0.20, 0.01, 0.12, 0.12]


@pytest.mark.parametrize("probs,top_k,top_groups,bias,rule,expected", [
    # k=3, M=1, paper: group score = top-3 sum: 0.44 vs 0.56 -> group 1.
    (SIX, 3, 1, None, "paper", [3, 4, 5]),
    # The same with the V3 Gate's rules: max 0.40 vs 0.20, or (with a bias,
    # here zero) top-2 sum 0.42 vs 0.38 -> group 0.
    (SIX, 3, 1, None, "v3_inference", [0, 1, 2]),
    (SIX, 3, 1, [0.0] * 6, "v3_inference", [0, 1, 2]),
    (SIX, 3, 1, [0.0] * 6, "paper", [3, 4, 5]),
    # k=2, M=2, paper: floor(2/2) = 1, the max: groups 0 (0.25) and 2 (0.20)
    # -> experts 0 and 4.
    (EIGHT, 2, 2, None, "paper", [0, 4]),
    (EIGHT, 2, 2, None, "v3_inference", [0, 4]),
    # V3 Gate with a bias: top-2 sums 0.26, 0.29, 0.21, 0.24 -> groups 1 and 0
    # -> experts 0 (0.25) and 2 (0.15).
    (EIGHT, 2, 2, [0.0] * 8, "v3_inference", [0, 2]),
    # k=4, M=2: floor(4/2) = 2, top-2 sums -> groups 1 and 0 -> all four.
    (EIGHT, 4, 2, None, "paper", [0, 1, 2, 3]),
])
def test_group_scores_by_hand(probs, top_k, top_groups, bias, rule, expected):
  assert _group_route(probs, top_k, top_groups, bias,
                      group_score=rule) == expected


def test_group_score_is_the_papers_by_default_and_checked():
  assert _group_route(SIX, 3, 1) == [3, 4, 5]
  with pytest.raises(ConfigError, match="needs top_k >= top_groups"):
    make_router("topk", num_experts=8, top_k=1, options={
        "num_groups": 4, "top_groups": 2})
  with pytest.raises(ConfigError, match="group_score='max'"):
    make_router("topk", num_experts=8, top_k=2, options={
        "num_groups": 4, "top_groups": 2, "group_score": "max"})
