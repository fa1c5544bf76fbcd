"""The MoE layer end to end: router + dispatch + experts against the naive loop."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.errors import ConfigError
from moejax.moe import MoELayer, expert_capacity
from moejax.moe.reference import capacity_keep_loop, moe_loop
from moejax.routing import make_router

B, L, D, F, E = 2, 12, 8, 16, 4


@pytest.mark.parametrize("router,top_k,path", [
    ("switch", 1, "capacity"), ("switch", 1, "dropless"),
    ("topk", 2, "capacity"), ("topk", 2, "dropless")])
def test_layer_matches_naive_loop(router, top_k, path):
  layer = MoELayer(router, num_experts=E, d_ff=F, top_k=top_k, dispatch=path,
                   capacity_factor=1.0)
  x_BLD = jax.random.normal(jax.random.key(1), (B, L, D))
  params = nn.unbox(layer.init(jax.random.key(0), x_BLD))["params"]

  def fast(p, x):
    return layer.apply({"params": p}, x)[0]

  routing = make_router(router, num_experts=E, top_k=top_k).apply(
      {"params": params["router"]}, x_BLD.reshape(-1, D))
  capacity = (expert_capacity(B * L, E, top_k, 1.0) if path == "capacity"
              else None)
  kept_TK = capacity_keep_loop(routing.expert_TK, routing.mask_TK, E, capacity)

  def naive(p, x):
    # Routing decisions are fixed (argmax has no gradient); weights are recomputed.
    r = make_router(router, num_experts=E, top_k=top_k).apply(
        {"params": p["router"]}, x.reshape(-1, D))
    y = moe_loop(x.reshape(-1, D), routing.expert_TK, r.weight_TK, kept_TK,
                 p["experts"]["w_in"], p["experts"]["w_out"])
    return y.reshape(B, L, D)

  np.testing.assert_allclose(fast(params, x_BLD), naive(params, x_BLD),
                             rtol=1e-5, atol=1e-5)
  g_fast = jax.grad(lambda p, x: jnp.sum(fast(p, x) ** 2), argnums=(0, 1))(
      params, x_BLD)
  g_naive = jax.grad(lambda p, x: jnp.sum(naive(p, x) ** 2), argnums=(0, 1))(
      params, x_BLD)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_naive)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_layer_reports_drops_and_load():
  layer = MoELayer("switch", num_experts=E, d_ff=F, capacity_factor=0.5)
  x_BLD = jax.random.normal(jax.random.key(2), (B, L, D))
  variables = layer.init(jax.random.key(0), x_BLD)
  _, aux = layer.apply(variables, x_BLD)
  # C = ceil(0.5 * 24 / 4) = 3, so at most 12 of 24 tokens are kept.
  assert float(aux.metrics["drop_frac"]) >= 0.5
  assert float(aux.metrics["load_max_over_mean"]) >= 1.0
  assert set(aux.metrics) >= {"balance_loss", "z_loss", "entropy", "load_cv",
                              "aux_loss"}


def test_bf16_compute_keeps_float32_router():
  layer = MoELayer("topk", num_experts=E, d_ff=F, top_k=2, dtype=jnp.bfloat16)
  x_BLD = jax.random.normal(jax.random.key(3), (B, L, D)).astype(jnp.bfloat16)
  variables = layer.init(jax.random.key(0), x_BLD)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(variables)))
  y_BLD, aux = layer.apply(variables, x_BLD)
  assert y_BLD.dtype == jnp.bfloat16
  assert aux.aux_loss.dtype == jnp.float32


def test_router_is_named_and_its_options_reach_it():
  """The layer builds its router by name with E, K, V and the options (under
  `router`), as make_router does; a bad option or a module is a one-line error."""
  x_BLD = jax.random.normal(jax.random.key(4), (B, L, D))
  layer = MoELayer("topk", num_experts=E, d_ff=F, top_k=2,
                   router_options={"jitter": 0.5})
  variables = nn.unbox(layer.init(jax.random.key(0), x_BLD))
  router = make_router("topk", num_experts=E, top_k=2,
                       options={"jitter": 0.5})
  assert (jax.tree.map(jnp.shape, variables["params"]["router"])
          == jax.tree.map(jnp.shape, nn.unbox(router.init(
              jax.random.key(0), x_BLD.reshape(-1, D)))["params"]))
  _, aux = layer.apply(variables, x_BLD)
  assert aux.trace["expert"].shape == (B * L, 2)  # K = top_k.
  # Jitter (an option) makes training routing depend on the `router` stream.
  y_a, _ = layer.apply(variables, x_BLD, deterministic=False,
                       rngs={"router": jax.random.key(1)})
  y_b, _ = layer.apply(variables, x_BLD, deterministic=False,
                       rngs={"router": jax.random.key(2)})
  assert not np.allclose(y_a, y_b)
  for bad, said in [({"router_options": {"jiter": 0.1}}, "has no option 'jiter'"),
                    ({"router": router}, "takes a router name, got TopKRouter")]:
    kwargs = {"router": "topk", "num_experts": E, "d_ff": F, **bad}
    with pytest.raises(ConfigError, match=re.escape(said)) as e:
      MoELayer(**kwargs).init(jax.random.key(0), x_BLD)
    assert "\n" not in str(e.value)


def test_unknown_router_name_is_a_one_line_error():
  layer = MoELayer("swtich", num_experts=E, d_ff=F)
  with pytest.raises(ConfigError, match="unknown router 'swtich'; valid"):
    layer.init(jax.random.key(0), jnp.ones((B, L, D)))


def test_router_that_cannot_feed_the_dispatch_path_is_rejected():
  """ReMoE feeds the dropless path only."""
  layer = MoELayer("remoe", num_experts=E, d_ff=F, dispatch="capacity")
  with pytest.raises(ConfigError, match="router 'remoe' supports dispatch "
                     "dropless, not 'capacity'") as e:
    layer.init(jax.random.key(0), jnp.ones((B, L, D)))
  assert "\n" not in str(e.value)
