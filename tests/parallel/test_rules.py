"""Sharding rules: expert weights (and Adam moments) on `expert`, batches on all."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moejax.errors import ConfigError
from moejax.models.config import MoEConfig, TransformerConfig
from moejax.models.transformer import TransformerLM
from moejax.parallel import (MeshConfig, batch_sharding, logical_shardings,
                             make_mesh, shard_batch)
from moejax.pytree import path_str
from moejax.train.program import init_state
from moejax.train.optimizer import OptimizerConfig, make_optimizer
from moejax.train.state import state_specs

CONFIG = TransformerConfig(
    vocab_size=32, max_len=8, num_layers=2, d_model=16, num_heads=2, d_ff=32,
    moe_layers=(1,), moe=MoEConfig(num_experts=8, top_k=2, router="topk"))


def _state_shardings(mesh, frozen=()):
  model = TransformerLM(CONFIG)
  tx = make_optimizer(OptimizerConfig(), 10, frozen)
  abstract = jax.eval_shape(lambda: init_state(model, tx, jax.random.key(0), 8))
  return logical_shardings(state_specs(model, tx, 8), abstract, mesh)


@pytest.mark.parametrize("frozen", [(), (r".*/router/.*",)])
def test_state_shardings_split_expert_weights_and_their_moments(frozen):
  mesh = make_mesh(MeshConfig(2, 4), num_experts=8)
  shardings = _state_shardings(mesh, frozen)
  flat = {path_str(p): s for p, s in
          jax.tree_util.tree_leaves_with_path(shardings)}
  expert = {k for k, s in flat.items() if s.spec == P("expert", None, None)}
  # w_in, w_out in params and in Adam's mu and nu: 6 leaves.
  assert len(expert) == 6
  assert all(k.endswith(("experts/w_in", "experts/w_out")) for k in expert)
  assert {k.split("/")[0] for k in expert} == {"params", "opt_state"}
  assert all(s.spec == P() for k, s in flat.items() if k not in expert)
  assert all(s.mesh == mesh for s in flat.values())


def test_every_param_takes_the_names_the_model_gives_it():
  mesh = make_mesh(MeshConfig(2, 4), num_experts=8)
  boxed = jax.eval_shape(TransformerLM(CONFIG).init, jax.random.key(0),
                         jnp.zeros((1, 8), jnp.int32))["params"]
  names = {path_str(p): tuple(box.names) for p, box in
           jax.tree_util.tree_leaves_with_path(
               boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))}
  params = _state_shardings(mesh).params
  for path, sharding in jax.tree_util.tree_leaves_with_path(params):
    want = tuple("expert" if n == "expert" else None for n in names[path_str(path)])
    assert tuple(sharding.spec) + (None,) * (len(want) - len(sharding.spec)) == want


def test_undividable_leaf_is_a_config_error():
  mesh = make_mesh(MeshConfig(2, 4), num_experts=8)
  tree = {"moe": {"experts": {"w_in": jax.ShapeDtypeStruct((6, 4, 4),
                                                           jnp.float32)}}}
  specs = {"moe": {"experts": {"w_in": P("expert", "embed", "mlp")}}}
  with pytest.raises(ConfigError, match=r"moe/experts/w_in has size 6 in dim 0"):
    logical_shardings(specs, tree, mesh)


def test_shard_batch_splits_rows_over_every_device():
  mesh = make_mesh(MeshConfig(2, 4), num_experts=8)
  tokens = np.arange(16 * 3, dtype=np.int32).reshape(16, 3)
  batch = shard_batch({"inputs": tokens, "targets": tokens + 1}, mesh)
  assert batch["inputs"].sharding == batch_sharding(mesh)
  assert {s.data.shape for s in batch["inputs"].addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(batch["targets"], tokens + 1)
  with pytest.raises(ConfigError, match=r"12 rows does not split over 8"):
    shard_batch({"inputs": tokens[:12]}, mesh)
