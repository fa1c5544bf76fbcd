"""Shared and fine-grained experts: both dispatch paths and the expert-parallel
layer against the naive per-token loop; the equal-active-FLOPs width rule."""

import functools

import flax.linen as nn
import jax
import pytest

from moejax.errors import ConfigError
from moejax.moe import MoELayer, expert_capacity
from moejax.moe.reference import capacity_keep_loop, moe_loop
from moejax.models.config import expert_width
from moejax.parallel import MeshConfig, make_mesh
from moejax.routing import make_router
from moejax.train import parse
from tests.conftest import assert_matches_loop

B, L, D = 8, 2, 8  # 16 tokens: 2 per device on the mesh.


# Coarse: 8 experts of width 16, top-2, 1 shared. Fine-grained (x2): 16
# experts of width 8, top-4, 2 shared: the same active FLOPs per token.
@pytest.mark.parametrize("num_experts,top_k,d_ff,shared,path,mesh_shape", [
    (8, 2, 16, 1, "capacity", None), (8, 2, 16, 1, "dropless", None),
    (16, 4, 8, 2, "capacity", (1, 8)), (16, 4, 8, 2, "dropless", (2, 4)),
])
def test_layer_matches_naive_loop(num_experts, top_k, d_ff, shared, path,
                                  mesh_shape):
  mesh = None if mesh_shape is None else make_mesh(MeshConfig(*mesh_shape),
                                                   num_experts=num_experts)
  # cf = E / K: C = all tokens of a device, so nothing is dropped anywhere.
  capacity_factor = num_experts / top_k

  def layer(mesh=None):
    return MoELayer("topk", num_experts=num_experts, d_ff=d_ff, top_k=top_k,
                    dispatch=path,
                    capacity_factor=capacity_factor, num_shared_experts=shared,
                    mesh=mesh)

  x_BLD = jax.random.normal(jax.random.key(1), (B, L, D))
  params = nn.unbox(layer().init(jax.random.key(0), x_BLD))["params"]
  assert params["shared_experts"]["w_in"].shape == (shared, D, d_ff)
  x_TD = x_BLD.reshape(-1, D)
  router = make_router("topk", num_experts=num_experts, top_k=top_k)
  routing = router.apply({"params": params["router"]}, x_TD)
  capacity = expert_capacity(B * L, num_experts, top_k, capacity_factor)
  kept_TK = capacity_keep_loop(routing.expert_TK, routing.mask_TK, num_experts,
                               capacity if path == "capacity" else None)
  assert kept_TK.all()

  def fast(p, mesh=mesh):
    return layer(mesh).apply({"params": p}, x_BLD)[0]

  def naive(p):
    weight_TK = router.apply({"params": p["router"]}, x_TD).weight_TK
    shared_w = (p["shared_experts"]["w_in"], p["shared_experts"]["w_out"])
    return moe_loop(x_TD, routing.expert_TK, weight_TK, kept_TK,
                    p["experts"]["w_in"], p["experts"]["w_out"],
                    shared=shared_w).reshape(B, L, D)

  # With a mesh, gradients against the single-device layer (checked here too).
  assert_matches_loop(fast, naive, params,
                      None if mesh is None else lambda p: fast(p, None))


def test_expert_width_rule():
  # F = 512: top-1 -> 512; top-2 -> 256; 4 experts per token (3 routed + 1
  # shared) -> 128; 3 per token does not split 512: a one-line error.
  width = functools.partial(expert_width, expert_d_ff=None, equal_flops=True)
  assert width(512, top_k=1) == 512
  assert width(512, top_k=2) == 256
  assert width(512, top_k=3, num_shared=1) == 128
  with pytest.raises(ConfigError, match="does not divide"):
    width(512, top_k=2, num_shared=1)
  assert expert_width(512, top_k=2, expert_d_ff=100, equal_flops=True) == 100
  assert expert_width(512, top_k=2, expert_d_ff=None, equal_flops=False) == 512


def test_config_keys_pick_width_and_shared_experts(tiny):
  c = tiny(model__router="topk", model__num_experts=16, model__top_k=3,
           model__num_shared_experts=1)
  moe = parse(c).model.moe
  # tiny F = 64: (3 + 1) experts per token of width 64 / 4 = 16.
  assert (moe.num_shared_experts, moe.d_ff) == (1, 16)
  c.model.expert_d_ff = 24  # Explicit widths win.
  assert parse(c).model.moe.d_ff == 24
  with pytest.raises(ConfigError, match="num_shared_experts must be an integer "
                     ">= 0, got -1"):
    parse(tiny(model__num_shared_experts=-1))
