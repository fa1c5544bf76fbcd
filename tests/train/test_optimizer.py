"""Weight decay: matrices decay, routing params do not unless the config says so."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import layout
from moejax.models import TransformerLM
from moejax.pytree import path_str
from moejax.routing import ROUTERS
from moejax.train import parse
from moejax.train.optimizer import OptimizerConfig, decay_mask, make_optimizer
from tests.conftest import tiny_config

# Every param each router owns, by name (their paths end in these).
ROUTER_PARAM_NAMES = {
    "switch": ["gate/kernel"], "topk": ["gate/kernel"],
    "expert_choice": ["gate/kernel"], "base": ["expert_embeddings"],
    "hash": [], "dts": ["gate/kernel"],
    "dselect_k": ["code/kernel", "code/bias", "mix/kernel", "mix/bias"],
    "stablemoe": ["centroids", "distill_embedding", "distill_centroids"],
    "remoe": ["gate/kernel"],
}


def _params(router: str):
  c = tiny_config()
  c.model.router = router
  c.model.router_options = {"distill_dim": 8} if router == "stablemoe" else {}
  if router == "remoe":
    c.model.dispatch = "dropless"  # Its only path.
  model = TransformerLM(parse(c).model)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                   jnp.zeros((1, 8), jnp.int32)))["params"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _by_path(tree) -> dict[str, object]:
  return {path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_router_names_cover_the_registry():
  assert set(ROUTER_PARAM_NAMES) == set(ROUTERS)


@pytest.mark.parametrize("router", sorted(ROUTER_PARAM_NAMES))
def test_routing_params_never_decay_unless_asked(router):
  params = _params(router)
  mask = _by_path(decay_mask(params))
  routing = [p for p in mask if "/router/" in p]
  # The tiny model has one MoE layer (block 1).
  assert sorted(p.split("/router/")[1] for p in routing) == sorted(
      ROUTER_PARAM_NAMES[router])
  assert not any(mask[p] for p in routing)
  # Matrices elsewhere decay (attention, experts, embeddings); vectors never.
  leaves = _by_path(params)
  for path, decays in mask.items():
    if "/router/" not in path:
      assert decays == (leaves[path].ndim >= 2), path
  with_router = _by_path(decay_mask(params, decay_router=True))
  for path in routing:
    assert with_router[path] == (leaves[path].ndim >= 2), path


def test_zero_gradient_step_moves_only_decayed_params():
  params = jax.tree.map(lambda p: jnp.ones_like(p), _params("stablemoe"))
  zero = jax.tree.map(jnp.zeros_like, params)
  for decay_router in (False, True):
    cfg = OptimizerConfig(warmup_steps=0, weight_decay=0.1,
                          decay_router=decay_router)
    tx = make_optimizer(cfg, total_steps=10)
    updates, _ = tx.update(zero, tx.init(params), params)
    moved = _by_path(jax.tree.map(lambda u: bool(np.any(u != 0)), updates))
    leaves = _by_path(params)
    for path, did in moved.items():
      router = "/router/" in path
      want = leaves[path].ndim >= 2 and (decay_router or not router)
      assert did == want, (decay_router, path)


def test_scanned_params_decay_like_their_unrolled_blocks():
  """A scanned leaf [R, ...] decays as its blocks do: norm scales [R, D] not."""
  c = tiny_config()
  c.model.num_layers = 4  # Blocks 1 and 3 MoE: one (dense, MoE) unit, R = 2.
  model = parse(c).model
  shapes = nn.unbox(jax.eval_shape(TransformerLM(model).init, jax.random.key(0),
                                   jnp.zeros((1, 8), jnp.int32)))["params"]
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  scan = dataclasses.replace(model, scan_layers=True)
  want = _by_path(layout.scanned(jax.tree.map(np.asarray, decay_mask(params)),
                                 scan))
  got = _by_path(decay_mask(layout.scanned(params, scan)))
  assert got.keys() == want.keys()
  for path, decays in got.items():
    assert np.all(want[path] == decays), path
  assert not got["stack_0/block_0/attn_norm/scale"]
  assert got["stack_0/block_0/attn/qkv/kernel"]
  assert got["stack_0/block_1/moe/experts/w_in"]
