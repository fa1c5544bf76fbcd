"""Routing replay: a recorded trace forced on the MoE layer and the whole model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.errors import ConfigError
from moejax.models.config import MoEConfig, TransformerConfig
from moejax.models.transformer import TransformerLM
from moejax.moe import MoELayer, expert_capacity
from moejax.moe.reference import capacity_keep_loop, moe_loop
from moejax.routing.replay import REPLAY_COLLECTION, replay_variables

B, L, D, F, E, K = 2, 8, 8, 16, 4, 2


@pytest.mark.parametrize("path", ["capacity", "dropless"])
def test_layer_dispatches_the_recorded_routes(path):
  layer = MoELayer("topk", num_experts=E, d_ff=F, top_k=K, dispatch=path,
                   capacity_factor=1.0)
  x_BLD = jax.random.normal(jax.random.key(1), (B, L, D))
  variables = nn.unbox(layer.init(jax.random.key(0), x_BLD))
  # Routes recorded under other params: they differ from the live routing.
  other = nn.unbox(layer.init(jax.random.key(7), x_BLD))
  recorded = layer.apply(other, x_BLD)[1].trace
  live = layer.apply(variables, x_BLD)[1].trace
  assert not np.array_equal(recorded["expert"], live["expert"])

  y_BLD, aux = layer.apply({**variables, REPLAY_COLLECTION: recorded}, x_BLD)
  for field in ("expert", "weight", "mask"):
    np.testing.assert_array_equal(aux.trace[field], recorded[field])
  capacity = expert_capacity(B * L, E, K, 1.0) if path == "capacity" else None
  kept_TK = capacity_keep_loop(recorded["expert"], recorded["mask"], E, capacity)
  experts = variables["params"]["experts"]
  y_naive = moe_loop(x_BLD.reshape(-1, D), recorded["expert"], recorded["weight"],
                     kept_TK, experts["w_in"], experts["w_out"])
  np.testing.assert_allclose(y_BLD.reshape(-1, D), y_naive, rtol=1e-5, atol=1e-6)


def test_replay_of_other_tokens_is_a_config_error():
  layer = MoELayer("topk", num_experts=E, d_ff=F, top_k=K)
  x_BLD = jax.random.normal(jax.random.key(1), (B, L, D))
  variables = layer.init(jax.random.key(0), x_BLD)
  short = jax.tree.map(lambda a: a[:5], layer.apply(variables, x_BLD)[1].trace)
  with pytest.raises(ConfigError, match="the layer routes 16 tokens"):
    layer.apply({**variables, REPLAY_COLLECTION: short}, x_BLD)


def test_model_replays_every_layer():
  config = TransformerConfig(
      vocab_size=32, max_len=L, num_layers=4, d_model=16, num_heads=2, d_ff=32,
      moe_layers=(1, 3), moe=MoEConfig(num_experts=E, top_k=K, router="topk"))
  model = TransformerLM(config)
  tokens_BL = jax.random.randint(jax.random.key(2), (B, L), 0, 32)
  variables = nn.unbox(model.init(jax.random.key(0), tokens_BL))
  other = nn.unbox(model.init(jax.random.key(5), tokens_BL))
  logits, aux = model.apply(variables, tokens_BL)
  recorded = jax.tree.map(np.asarray, model.apply(other, tokens_BL)[1]["trace"])
  assert sorted(recorded) == ["layer_1", "layer_3"]
  assert recorded["layer_1"]["expert"].shape == (B * L, K)
  # Replaying a model's own routes changes nothing.
  same, _ = model.apply({**variables, **replay_variables(aux["trace"])}, tokens_BL)
  np.testing.assert_array_equal(same, logits)
  replayed, aux_r = model.apply({**variables, **replay_variables(recorded)},
                                tokens_BL)
  for layer in recorded:
    np.testing.assert_array_equal(aux_r["trace"][layer]["expert"],
                                  recorded[layer]["expert"])
  assert not np.allclose(replayed, logits)
  assert sorted(replay_variables(recorded)[REPLAY_COLLECTION]["block_3"]["moe"]) == [
      "expert", "mask", "weight"]
  with pytest.raises(ConfigError, match="is not a MoE layer's name"):
    replay_variables({"block_1": recorded["layer_1"]})
  with pytest.raises(ConfigError, match="has fields"):
    replay_variables({"layer_1": {"expert": recorded["layer_1"]["expert"]}})
  # jnp arrays and numpy arrays make the same collection.
  assert jax.tree.structure(replay_variables(recorded)) == jax.tree.structure(
      replay_variables(jax.tree.map(jnp.asarray, recorded)))
