"""Deep experts (model.expert_depth): stacks of residual FFN sublayers against
the naive per-token loop, on both dispatch paths, with and without the 8-device
expert-parallel mesh; depth 1 keeps today's params; config, counts, transforms."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.errors import ConfigError
from moejax.metrics.writers import read_metrics, series
from moejax.models.config import active_ffn_flops_per_token
from moejax.models.sizes import param_counts
from moejax.moe import MoELayer, expert_capacity
from moejax.moe.reference import capacity_keep_loop, deep_expert_loop, moe_loop
from moejax.parallel import MeshConfig, make_mesh
from moejax.parallel.rules import logical_spec
from moejax.routing import make_router
from moejax.train import parse, train_and_evaluate
from moejax.train.config import stage_config
from tests.conftest import tiny_config

D, F = 8, 16
ROUTERS = {1: "switch", 2: "topk"}


def _inputs(batch, length, seed=1):
  """(normed input x, residual stream r): different arrays, so a layer that
  fed the experts the wrong one would fail."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(k1, (batch, length, D)),
          2.0 * jax.random.normal(k2, (batch, length, D)))


def _naive(params, x_BLD, r_BLD, top_k, num_experts, kept_TK, expert_TK):
  """The loop with the routing decisions fixed, gates recomputed."""
  routing = make_router(ROUTERS[top_k], num_experts=num_experts, top_k=top_k
                        ).apply({"params": params["router"]}, x_BLD.reshape(-1, D))
  y_TD = moe_loop(x_BLD.reshape(-1, D), expert_TK, routing.weight_TK, kept_TK,
                  params["experts"]["w_in"], params["experts"]["w_out"],
                  residual_TD=r_BLD.reshape(-1, D))
  return y_TD.reshape(x_BLD.shape)


def _assert_close_with_grads(fast, naive, args, rtol=1e-4):
  np.testing.assert_allclose(jax.jit(fast)(*args), naive(*args), rtol=1e-5,
                             atol=1e-5)
  g_fast = jax.jit(jax.grad(lambda *a: jnp.sum(fast(*a) ** 2),
                            argnums=(0, 1, 2)))(*args)
  g_naive = jax.grad(lambda *a: jnp.sum(naive(*a) ** 2), argnums=(0, 1, 2))(*args)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_naive), strict=True):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-5)


def test_deep_expert_loop_by_hand():
  """Depth 2, one expert, D = 2, F = 1, ReLU: z0 = (3, 4), rms(z0) = 3.5355
  (sqrt(12.5)), normed (0.8485, 1.1314); sublayer 1: h = relu(0.8485 + 1.1314)
  = 1.9799, update (1.9799, 0) -> z1 = (4.9799, 4); rms(z1) = 4.5166 (sqrt of
  (24.80 + 16) / 2), normed (1.1026, 0.8856); sublayer 2: h = relu(-0.8856) = 0,
  no update. Output z2 - z0 = (1.9799, 0)."""
  w_in = jnp.array([[[1.0], [1.0]], [[0.0], [-1.0]]])  # [n=2, D=2, F=1]
  w_out = jnp.array([[[1.0, 0.0]], [[5.0, 5.0]]])      # [n=2, F=1, D=2]
  out = deep_expert_loop(jnp.array([3.0, 4.0]), w_in, w_out, jax.nn.relu)
  np.testing.assert_allclose(out, [1.9799, 0.0], atol=1e-4)


@pytest.mark.parametrize("top_k,path,cf", [
    (1, "capacity", 1.0), (1, "dropless", 1.0), (2, "capacity", 1.0),
    (2, "dropless", 1.0)])
def test_deep_layer_matches_naive_loop(top_k, path, cf):
  """Depth 3 on one device; capacity factor 1 drops some tokens on the
  capacity path (they get 0, as the loop's unkept slots do)."""
  batch, length, experts = 2, 12, 4
  layer = MoELayer(ROUTERS[top_k], num_experts=experts, d_ff=F, top_k=top_k,
                   dispatch=path, capacity_factor=cf, expert_depth=3)
  x_BLD, r_BLD = _inputs(batch, length)
  params = nn.unbox(layer.init(jax.random.key(0), x_BLD,
                               residual_BLD=r_BLD))["params"]
  assert params["experts"]["w_in"].shape == (experts, 3, D, F)
  assert params["experts"]["w_out"].shape == (experts, 3, F, D)
  routing = make_router(ROUTERS[top_k], num_experts=experts, top_k=top_k).apply(
      {"params": params["router"]}, x_BLD.reshape(-1, D))
  capacity = (expert_capacity(batch * length, experts, top_k, cf)
              if path == "capacity" else None)
  kept_TK = capacity_keep_loop(routing.expert_TK, routing.mask_TK, experts,
                               capacity)
  if path == "capacity":
    assert not kept_TK.all()  # The drops are exercised.

  def fast(p, x, r):
    return layer.apply({"params": p}, x, residual_BLD=r)[0]

  def naive(p, x, r):
    return _naive(p, x, r, top_k, experts, kept_TK, routing.expert_TK)

  _assert_close_with_grads(fast, naive, (params, x_BLD, r_BLD))


@pytest.mark.parametrize("top_k,path,mesh_shape", [
    (1, "capacity", (1, 8)), (2, "dropless", (1, 8)), (2, "capacity", (2, 4))])
def test_deep_expert_parallel_layer_matches_naive_loop(top_k, path, mesh_shape):
  """Depth 2 on the 8-device mesh (the local experts' [G, n, D, F] slices run
  inside shard_map); cf = E / K: no slot is dropped on any device."""
  batch, length, experts = 16, 4, 8  # 64 tokens: 8 per device.
  mesh = make_mesh(MeshConfig(*mesh_shape), num_experts=experts)
  kw = dict(num_experts=experts, d_ff=F, top_k=top_k, dispatch=path,
            capacity_factor=experts / top_k, expert_depth=2)
  # The aux loss is per device on the mesh; the loop compares outputs only.
  layer = MoELayer(ROUTERS[top_k], mesh=mesh, **kw)
  x_BLD, r_BLD = _inputs(batch, length, seed=2)
  params = nn.unbox(MoELayer(ROUTERS[top_k], **kw).init(
      jax.random.key(0), x_BLD, residual_BLD=r_BLD))["params"]
  routing = make_router(ROUTERS[top_k], num_experts=experts, top_k=top_k).apply(
      {"params": params["router"]}, x_BLD.reshape(-1, D))

  def fast(p, x, r):
    return layer.apply({"params": p}, x, residual_BLD=r)[0]

  def naive(p, x, r):
    return _naive(p, x, r, top_k, experts, np.asarray(routing.mask_TK),
                  routing.expert_TK)

  compiled = jax.jit(fast).lower(params, x_BLD, r_BLD).compile()
  assert "all-to-all" in compiled.as_text()
  _assert_close_with_grads(fast, naive, (params, x_BLD, r_BLD))


def test_depth_one_keeps_todays_params_and_program():
  """Depth 1: [E, D, F] / [E, F, D] with axes (expert, embed, mlp), and the
  experts read the normed input, not the residual stream."""
  x_BLD, r_BLD = _inputs(2, 6)
  layer = MoELayer("switch", num_experts=4, d_ff=F)
  boxed = layer.init(jax.random.key(0), x_BLD)["params"]["experts"]
  assert boxed["w_in"].value.shape == (4, D, F)
  assert boxed["w_out"].value.shape == (4, F, D)
  assert boxed["w_in"].names == ("expert", "embed", "mlp")
  variables = nn.unbox(layer.init(jax.random.key(0), x_BLD))
  np.testing.assert_array_equal(
      layer.apply(variables, x_BLD)[0],
      MoELayer("switch", num_experts=4, d_ff=F, expert_depth=1).apply(
          variables, x_BLD, residual_BLD=r_BLD)[0])
  deep = MoELayer("switch", num_experts=4, d_ff=F, expert_depth=2).init(
      jax.random.key(0), x_BLD, residual_BLD=r_BLD)["params"]["experts"]
  assert deep["w_in"].names == ("expert", "expert_depth", "embed", "mlp")
  # Expert parallelism splits the leading axis only; the sublayers stay whole.
  assert logical_spec(deep["w_in"].names) == jax.sharding.PartitionSpec(
      "expert", None, None, None)


def test_deep_layer_needs_the_residual_stream():
  x_BLD, _ = _inputs(2, 6)
  with pytest.raises(ConfigError, match="pass residual_BLD"):
    MoELayer("switch", num_experts=4, d_ff=F, expert_depth=2).init(
        jax.random.key(0), x_BLD)


@pytest.mark.parametrize("bad", [0, -1])
def test_expert_depth_must_be_a_positive_integer(bad):
  with pytest.raises(ConfigError, match=re.escape(
      f"model.expert_depth must be an integer >= 1, got {bad!r}")) as e:
    parse(tiny_config(model__expert_depth=bad))
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [0, 1.5, True])
def test_layer_checks_its_depth(bad):
  """(The config refuses a float or a bool itself: its key is an int.)"""
  x_BLD, r_BLD = _inputs(2, 6)
  with pytest.raises(ConfigError, match=re.escape(
      f"model.expert_depth must be an integer >= 1, got {bad!r}")):
    MoELayer("switch", num_experts=4, d_ff=F, expert_depth=bad).init(
        jax.random.key(0), x_BLD, residual_BLD=r_BLD)


def test_upcycle_to_deep_experts_is_refused_at_parse():
  c = tiny_config(model__expert_depth=2, train__init_from="/tmp/nowhere")
  c.stages = [stage_config("up", transform="upcycle")]
  with pytest.raises(ConfigError, match="dense FFN of depth 1, but "
                     "model.expert_depth=2") as e:
    parse(c)
  assert "\n" not in str(e.value)


def test_counts_include_the_depth():
  """Tiny model (D = 32, F = 64, 2 blocks, block 1 MoE, E = 4, K = 1): each
  extra sublayer adds E x 2 D F = 4 x 4096 params (1 x 4096 active) and
  4 D F = 8192 FLOPs per token."""
  one = parse(tiny_config()).stages[0].model
  three = parse(tiny_config(model__expert_depth=3)).stages[0].model
  assert three.moe.expert_depth == 3 and one.moe.expert_depth == 1
  (total1, active1), (total3, active3) = param_counts(one), param_counts(three)
  assert total3 - total1 == 2 * 4 * 2 * 32 * 64
  assert active3 - active1 == 2 * 2 * 32 * 64
  assert (active_ffn_flops_per_token(three) - active_ffn_flops_per_token(one)
          == 2 * 4 * 32 * 64)


def test_tiny_run_with_deep_experts_learns(tmp_path):
  summary = train_and_evaluate(
      parse(tiny_config(model__expert_depth=2, train__steps=30,
                        train__eval_every=30, train__checkpoint_every=30)),
      tmp_path, verbose=False)
  _, losses = series(read_metrics(tmp_path), "train/loss")
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.3
  assert np.isfinite(summary["eval/loss"])
