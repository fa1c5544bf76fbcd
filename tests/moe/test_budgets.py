"""Slot budgets: the cheaper dispatch equals the K-slot program, values and gradients.

The K-slot program (`routed_ffn(..., budgets=False)`, the routed FFN of
`moejax.moe.routed` at all its rows) is itself checked against
the naive per-token loop here. 8 simulated CPU devices (tests/conftest.py) for
the expert-parallel cases.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe import budgets
from moejax.moe.experts import Experts
from moejax.moe.routed import RoutedFFN
from moejax.moe.reference import capacity_keep_loop, moe_loop
from moejax.parallel import MeshConfig, make_mesh
from moejax.routing import ROUTER_STATE, Routing, make_router
from moejax.routing.contract import Slots

T, D, F, E = 64, 8, 16, 8  # K = E slots: budgets for 1, 1.125, 1.25, 2, 4, 8 per token.


def _weights(seed=0):
  params = nn.unbox(Experts(E, D, F).init(jax.random.key(seed)))["params"]
  return params["w_in"], params["w_out"]


def _ffn(path, *, mesh=None, capacity_factor=1.25, num_tokens=T,
         num_experts=E) -> RoutedFFN:
  return RoutedFFN.create(path, num_tokens=num_tokens, num_experts=num_experts,
                          mesh=mesh, capacity_factor=capacity_factor)


def _run(path, *, mesh=None, capacity_factor=1.25, use_budgets=True):
  """(x, routing, w_in, w_out) -> (y, kept) of the budgeted routed FFN."""
  def run(x_TD, routing, w_in, w_out):
    ffn = _ffn(path, mesh=mesh, capacity_factor=capacity_factor,
               num_tokens=x_TD.shape[0], num_experts=w_in.shape[0])
    return budgets.routed_ffn(ffn, x_TD, routing, w_in, w_out,
                              budgets=use_budgets)
  return run


def _routing(density: str, seed: int = 0, capacity=None) -> Routing:
  """K = E slots (slot e is expert e): one, one or two, or every expert used."""
  rng = np.random.default_rng(seed)
  first_T = rng.integers(0, E, T)
  mask_TE = np.eye(E, dtype=bool)[first_T]
  if density == "one_or_two":
    second_T = (first_T + rng.integers(1, E, T)) % E
    mask_TE |= np.eye(E, dtype=bool)[second_T] & (rng.uniform(size=(T, 1)) < 0.5)
  elif density == "all":
    mask_TE[:] = True
  return Routing(
      expert_TK=jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32), (T, E)),
      weight_TK=jnp.asarray(rng.uniform(0.1, 1.0, (T, E)), jnp.float32),
      mask_TK=jnp.asarray(mask_TE), aux_loss=jnp.zeros(()), metrics={},
      slots=Slots(per_expert=capacity, dense=0))


def _loss_and_grads(fn, x_TD, routing, w_in, w_out):
  """(y, kept) and the gradients of sum(y * c) w.r.t. x, the weights and w."""
  cot_TD = jax.random.normal(jax.random.key(9), (T, D))

  def loss(x, weight, w_in, w_out):
    y_TD, kept_TK = fn(x, routing.replace(weight_TK=weight), w_in, w_out)
    return jnp.sum(y_TD * cot_TD), (y_TD, kept_TK)

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3),
                                               has_aux=True))(
      x_TD, routing.weight_TK, w_in, w_out)
  return out, grads


def _assert_same(a, b):
  (y_a, kept_a), g_a = a
  (y_b, kept_b), g_b = b
  np.testing.assert_array_equal(kept_a, kept_b)
  np.testing.assert_allclose(y_a, y_b, rtol=1e-5, atol=1e-6)
  for u, v in zip(g_a, g_b, strict=True):
    np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)


def test_slot_ladder_and_sizes():
  assert budgets.slot_ladder(1) == (1,)
  assert budgets.slot_ladder(2) == (1, 1.125, 1.25, 2)
  assert budgets.slot_ladder(8) == (1, 1.125, 1.25, 2, 4, 8)
  assert budgets.slot_ladder(6) == (1, 1.125, 1.25, 2, 4, 6)
  # dropless: ceil(S * k) rows; capacity: ceil(C * k / K) rows per expert.
  # C = ceil(1.25 * 64 * 8 / 8) = 80.
  routing, ladder = _routing("one"), budgets.slot_ladder(8)
  assert budgets.budget_sizes(_ffn("dropless"), routing, ladder) == (
      64, 72, 80, 128, 256, 512)
  assert budgets.budget_sizes(_ffn("capacity"), routing, ladder) == (
      10, 12, 13, 20, 40, 80)
  assert budgets.budget_sizes(_ffn("capacity"), routing, (8,)) == (80,)


@pytest.mark.parametrize("path,density,capacity,index", [
    # dropless: used slots T, ~1.5T, 8T -> budgets 1, 2, 8 slots per token.
    ("dropless", "one", None, 0), ("dropless", "one_or_two", None, 3),
    ("dropless", "all", None, 5),
    # capacity C = T (fixed by the router, as DSelect-k): the largest load of
    # one-expert routing (11-16 of 64) fits C/4 = 16 rows; all experts need 64.
    ("capacity", "one", T, 3), ("capacity", "all", T, 5),
    # C = ceil(1.25 * T * 8 / 8) = 80; one-or-two routing's largest load (21
    # of 96 slots here) needs C/2 = 40 rows.
    ("capacity", "one_or_two", None, 4)])
def test_budget_equals_k_slot_program_and_naive_loop(path, density, capacity,
                                                     index):
  routing = _routing(density, capacity=capacity)
  x_TD = jax.random.normal(jax.random.key(1), (T, D))
  w_in, w_out = _weights()
  cheap = _loss_and_grads(_run(path), x_TD, routing, w_in, w_out)
  full = _loss_and_grads(_run(path, use_budgets=False), x_TD, routing, w_in,
                         w_out)
  _assert_same(cheap, full)
  # The switch takes the expected (small) budget.
  cap = capacity or 80
  sizes = budgets.budget_sizes(_ffn(path), routing, budgets.slot_ladder(E))
  need = _ffn(path).rows_needed(routing)
  assert int(np.sum(np.asarray(sizes[:-1]) < int(need))) == index
  # And the K-slot program is the naive loop.
  kept_TK = capacity_keep_loop(routing.expert_TK, routing.mask_TK, E,
                               cap if path == "capacity" else None)
  np.testing.assert_array_equal(full[0][1], kept_TK)
  y_loop = moe_loop(x_TD, routing.expert_TK, routing.weight_TK, kept_TK, w_in,
                    w_out)
  np.testing.assert_allclose(full[0][0], y_loop, rtol=1e-5, atol=1e-5)


def test_the_program_branches_at_run_time():
  routing = _routing("one")
  w_in, w_out = _weights()
  x_TD = jnp.zeros((T, D))
  text = jax.jit(_run("dropless")).lower(x_TD, routing, w_in, w_out).as_text()
  assert "case" in text  # stablehlo.case: one branch per budget.


@pytest.mark.parametrize("path,mesh_shape,density", [
    ("dropless", (2, 4), "one_or_two"), ("dropless", (1, 8), "one"),
    ("capacity", (1, 8), "one_or_two"), ("capacity", (2, 4), "all")])
def test_expert_parallel_budget_equals_k_slot_program(path, mesh_shape, density):
  # C = T: no slot can be dropped on any device, so the single-device K-slot
  # program is the reference too.
  mesh = make_mesh(MeshConfig(*mesh_shape), num_experts=E)
  routing = _routing(density, seed=3, capacity=T)
  x_TD = jax.random.normal(jax.random.key(4), (T, D))
  w_in, w_out = _weights(1)
  cheap = _loss_and_grads(_run(path, mesh=mesh), x_TD, routing, w_in, w_out)
  _assert_same(cheap, _loss_and_grads(
      _run(path, mesh=mesh, use_budgets=False), x_TD, routing, w_in, w_out))
  _assert_same(cheap, _loss_and_grads(
      _run(path, use_budgets=False), x_TD, routing, w_in, w_out))


def _slots(routing: Routing, which: slice) -> Routing:
  """The routing of some of the K slots."""
  return routing.replace(expert_TK=routing.expert_TK[:, which],
                         weight_TK=routing.weight_TK[:, which],
                         mask_TK=routing.mask_TK[:, which])


def _fixed_routing(extra: str, seed: int = 0) -> Routing:
  """K = E slots, slot 0 used by every token (`Slots.dense = 1`) and the other
  slots (distinct experts) used by no token, a few tokens, or every token."""
  rng = np.random.default_rng(seed)
  expert_TE = np.argsort(rng.uniform(size=(T, E)), axis=1).astype(np.int32)
  mask_TE = np.zeros((T, E), bool)
  mask_TE[:, 0] = True
  if extra == "few":
    mask_TE[3, 1] = True
    mask_TE[17, 5] = True
  elif extra == "all":
    mask_TE[:] = True
  return Routing(
      expert_TK=jnp.asarray(expert_TE),
      weight_TK=jnp.asarray(rng.uniform(0.1, 1.0, (T, E)), jnp.float32),
      mask_TK=jnp.asarray(mask_TE), aux_loss=jnp.zeros(()), metrics={},
      slots=Slots(per_expert=T, dense=1))


def test_tail_ladder_and_sizes():
  assert budgets.tail_ladder(1) == (0, 1 / 32, 0.25, 1)
  assert budgets.tail_ladder(7) == (0, 1 / 32, 0.25, 1, 2, 4, 7)
  tail = _slots(_fixed_routing("none"), slice(1, None))  # K = 7.
  assert budgets.budget_sizes(_ffn("dropless"), tail, budgets.tail_ladder(7)
                              ) == (0, 2, 16, 64, 128, 256, 448)


@pytest.mark.parametrize("extra,tail_index", [("none", 0), ("few", 1),
                                              ("all", 6)])
@pytest.mark.parametrize("mesh_shape", [None, (2, 4)])
def test_fixed_slots_outside_the_switch_equal_k_slot_program(extra, tail_index,
                                                             mesh_shape):
  """Dropless with `Slots.dense = 1`: slot 0 at a static size plus the budgeted
  tail (no tail slot used: the zero branch) equals the K-slot program and the
  naive loop, values and gradients, on one device and expert-parallel."""
  routing = _fixed_routing(extra)
  x_TD = jax.random.normal(jax.random.key(1), (T, D))
  w_in, w_out = _weights()
  mesh = mesh_shape and make_mesh(MeshConfig(*mesh_shape), num_experts=E)
  cheap = _loss_and_grads(_run("dropless", mesh=mesh), x_TD, routing, w_in,
                          w_out)
  full = _loss_and_grads(_run("dropless", use_budgets=False), x_TD, routing,
                         w_in, w_out)
  _assert_same(cheap, full)
  np.testing.assert_array_equal(cheap[0][1], routing.mask_TK)
  y_loop = moe_loop(x_TD, routing.expert_TK, routing.weight_TK,
                    routing.mask_TK, w_in, w_out)
  np.testing.assert_allclose(cheap[0][0], y_loop, rtol=1e-5, atol=1e-5)
  # The tail's budget on one device (sizes 0, 2, 16, ... rows): none used ->
  # 0 rows (the zero branch); two slots -> 2 rows; every slot -> all 7 * 64.
  tail = _slots(routing, slice(1, None))
  sizes = budgets.budget_sizes(_ffn("dropless"), tail,
                               budgets.tail_ladder(E - 1))
  need = _ffn("dropless").rows_needed(tail)
  assert int(np.sum(np.asarray(sizes[:-1]) < int(need))) == tail_index


def test_fixed_slots_are_not_in_the_conditional():
  """The static part's grouped matmuls (`ragged_dot`) run outside the `case`;
  a budget switch over all K slots has none outside it."""
  x_TD = jnp.zeros((T, D))
  w_in, w_out = _weights()

  def dots(jaxpr):  # ragged_dot eqns, nested calls included, conds not.
    count = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "cond":
        continue
      count += eqn.primitive.name.startswith("ragged_dot")
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else [value]:
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            count += dots(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            count += dots(sub)
    return count

  def outside_dots(routing):
    return dots(jax.make_jaxpr(_run("dropless"))(
        x_TD, routing, w_in, w_out).jaxpr)

  fixed = _fixed_routing("few")
  assert outside_dots(fixed) == 2  # w_in and w_out of slot 0.
  assert outside_dots(fixed.replace(slots=Slots(per_expert=T, dense=0))) == 0


def _saturated_codes(params):
  """DSelect-k's code logits pushed past +-gamma/2: every selector is binary."""
  code = params["code"]
  return {**params, "code": {"kernel": jnp.zeros_like(code["kernel"]),
                             "bias": jnp.where(code["bias"] >= 0, 1.0, -1.0)}}


# (router, options, phases: (name, stage step, params transform, most slots
# per token)); phases of one router share one compiled program.
E_ROUTER = 4  # Budgets for 1, 1.125, 1.25, 2, 4 slots per token: fewer to compile.
ROUTER_CASES = [
    ("dts", {"hard_step": 5}, [("soft", 0, None, E_ROUTER),
                               ("hard", 5, None, 1)]),
    ("dts", {"max_experts": 3}, [("soft capped", 0, None, 3)]),
    ("dselect_k", {}, [("dense codes", None, None, E_ROUTER),
                       ("binary codes", None, _saturated_codes, 1)]),
    ("expert_choice", {}, [("train", None, None, None)]),
]


@pytest.mark.parametrize("path", ["dropless", "capacity"])
@pytest.mark.parametrize("name,options,phases", ROUTER_CASES,
                         ids=[f"{c[0]}-{c[2][0][0]}" for c in ROUTER_CASES])
def test_routers_cheap_dispatch_equals_k_slot_version(name, options, phases,
                                                      path):
  """Routing, outputs and gradients (router params included) are unchanged,
  in every phase of the router."""
  router = make_router(name, num_experts=E_ROUTER, options=options)
  x_TD = jax.random.normal(jax.random.key(5), (T, D))
  rngs = {"router": jax.random.key(6)}
  needs_step = phases[0][1] is not None
  init_step = {"step": jnp.int32(0)} if needs_step else {}
  params = nn.unbox(router.init({"params": jax.random.key(7), **rngs}, x_TD,
                                **init_step))["params"]
  w_in, w_out = (w[:E_ROUTER] for w in _weights(2))

  def loss(p, w_in, w_out, x, step, use_budgets):
    extra = {"step": step} if needs_step else {}
    routing = router.apply({"params": p}, x, deterministic=False, rngs=rngs,
                           **extra)
    y_TD, _ = _run(path, use_budgets=use_budgets)(x, routing, w_in, w_out)
    return jnp.sum(y_TD**2) + routing.aux_loss, (y_TD, routing.mask_TK)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True),
                 static_argnums=5)
  for phase, step, prepare, most in phases:
    p = params if prepare is None else prepare(params)
    step = jnp.int32(step or 0)
    (_, (y_cheap, mask_cheap)), g_cheap = grad(p, w_in, w_out, x_TD, step, True)
    (_, (y_full, mask_full)), g_full = grad(p, w_in, w_out, x_TD, step, False)
    if most is not None:
      assert int(mask_cheap.sum(-1).max()) == most, phase
    np.testing.assert_array_equal(mask_cheap, mask_full)
    np.testing.assert_allclose(y_cheap, y_full, rtol=1e-5, atol=1e-6)
    for u, v in zip(jax.tree.leaves(g_cheap), jax.tree.leaves(g_full),
                    strict=True):
      np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)


def test_remoe_cheap_dispatch_equals_k_slot_version():
  """ReMoE's ReLU gates open a varying number of experts per token; the budget
  its batch uses gives the E-slot program's outputs and gradients."""
  router = make_router("remoe", num_experts=E_ROUTER)
  x_TD = jax.random.normal(jax.random.key(5), (T, D))
  variables = nn.unbox(router.init(jax.random.key(7), x_TD))
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  w_in, w_out = (w[:E_ROUTER] for w in _weights(2))

  def loss(p, w_in, w_out, use_budgets):
    routing, _ = router.apply({"params": p, **state}, x_TD, deterministic=False,
                              mutable=[ROUTER_STATE])
    assert routing.slots.sparse(E_ROUTER)
    y_TD, _ = _run("dropless", use_budgets=use_budgets)(x_TD, routing, w_in,
                                                        w_out)
    return jnp.sum(y_TD**2) + routing.aux_loss, (y_TD, routing.mask_TK)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                 static_argnums=3)
  (_, (y_cheap, mask_cheap)), g_cheap = grad(params, w_in, w_out, True)
  (_, (y_full, mask_full)), g_full = grad(params, w_in, w_out, False)
  per_token = np.asarray(mask_full.sum(-1))
  assert per_token.min() < per_token.max() <= E_ROUTER  # Really varying.
  np.testing.assert_array_equal(mask_cheap, mask_full)
  np.testing.assert_allclose(y_cheap, y_full, rtol=1e-5, atol=1e-6)
  for u, v in zip(jax.tree.leaves(g_cheap), jax.tree.leaves(g_full), strict=True):
    np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path,capacity_factor", [
    ("dropless", 1.25),
    # One slot: C = ceil(cf * T / E); E-slot: ceil(cf * T). At cf = E both hold
    # every token, so nothing is dropped and the two must agree exactly.
    ("capacity", float(E_ROUTER))])
def test_dts_hard_phase_one_slot_equals_e_slot_version(path, capacity_factor):
  """The DTS hard phase as the trainer compiles it (`hard_step=-1`: one slot
  per token) against the E-slot router past its `hard_step`: same outputs,
  aux loss and gradients (router params included)."""
  x_TD = jax.random.normal(jax.random.key(5), (T, D))
  rngs = {"router": jax.random.key(6)}
  w_in, w_out = (w[:E_ROUTER] for w in _weights(2))
  step = jnp.int32(7)
  e_slot = make_router("dts", num_experts=E_ROUTER, options={"hard_step": 5})
  one = make_router("dts", num_experts=E_ROUTER, options={"hard_step": -1})
  params = nn.unbox(e_slot.init({"params": jax.random.key(7), **rngs}, x_TD,
                                step=step))["params"]

  def loss(router, p, w_in, w_out, x):
    routing = router.apply({"params": p}, x, deterministic=False, rngs=rngs,
                           step=step)
    y_TD, kept_TK = _run(path, capacity_factor=capacity_factor,
                         use_budgets=False)(x, routing, w_in, w_out)
    used = jnp.sum(jnp.where(kept_TK, 1.0, 0.0))
    return jnp.sum(y_TD**2) + routing.aux_loss, (y_TD, used,
                                                 routing.expert_TK.shape[1])

  def run(router):
    fn = jax.value_and_grad(functools.partial(loss, router), argnums=(0, 1, 2, 3),
                            has_aux=True)
    return fn(params, w_in, w_out, x_TD)

  (l_e, (y_e, used_e, k_e)), g_e = run(e_slot)
  (l_1, (y_1, used_1, k_1)), g_1 = run(one)
  assert (k_e, k_1) == (E_ROUTER, 1)
  assert int(used_e) == int(used_1) == T  # Every token, one slot each.
  np.testing.assert_allclose(l_1, l_e, rtol=1e-6)
  np.testing.assert_allclose(y_1, y_e, rtol=1e-5, atol=1e-6)
  for u, v in zip(jax.tree.leaves(g_1), jax.tree.leaves(g_e), strict=True):
    np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)
