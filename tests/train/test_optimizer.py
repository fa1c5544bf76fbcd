"""Weight decay: matrices decay, routing params do not unless the config says so."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
