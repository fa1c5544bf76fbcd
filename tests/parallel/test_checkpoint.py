"""A sharded train state saved on one mesh restores onto another and onto one device.

Tolerance: the eval loss agrees to rtol 1e-6 across layouts (float32; only the
order of sums differs), and every restored leaf is bit-identical.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from moejax.models.config import MoEConfig, TransformerConfig
from moejax.models.transformer import TransformerLM
from moejax.parallel import (MeshConfig, logical_shardings, make_mesh,
                             shard_batch, with_shardings)
from moejax.train.checkpoint import Checkpointer
from moejax.train.program import init_state
from moejax.train.optimizer import OptimizerConfig, make_optimizer
from moejax.train.state import state_specs
from moejax.train.step import make_eval_step

E, B, SEQ = 8, 8, 8
# Dropless: the same function on every layout (capacity would drop per device).
CONFIG = TransformerConfig(
    vocab_size=32, max_len=SEQ, num_layers=2, d_model=16, num_heads=2, d_ff=32,
    moe_layers=(1,), moe=MoEConfig(num_experts=E, top_k=2, router="topk",
                                   dispatch="dropless"))


def _model(mesh):
  """TransformerLM running its MoE layers expert-parallel where it takes a mesh."""
  if mesh is not None and "mesh" in {f.name for f in dataclasses.fields(
      TransformerLM)}:
    return TransformerLM(CONFIG, mesh=mesh)
  return TransformerLM(CONFIG)


def _eval_loss(model, variables, batch):
  out = jax.jit(make_eval_step(model))(variables, batch)
  return float(out["loss_sum"] / out["tokens"])


def test_checkpoint_moves_between_meshes(tmp_path):
  tx = make_optimizer(OptimizerConfig(), 10)
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (B, SEQ + 1), 0, 32))
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

  mesh8 = make_mesh(MeshConfig(data=1, expert=8), num_experts=E)
  model8 = _model(mesh8)
  init = lambda: init_state(model8, tx, jax.random.key(0), SEQ)  # noqa: E731
  abstract = jax.eval_shape(init)
  specs = state_specs(model8, tx, SEQ)
  state = jax.jit(init, out_shardings=logical_shardings(specs, abstract, mesh8))()
  # Non-zero Adam moments, so the round trip checks them too.
  state = state.replace(opt_state=jax.tree.map(
      lambda a: a + jnp.asarray(1, a.dtype), state.opt_state))
  w_in = state.params["block_1"]["moe"]["experts"]["w_in"]
  assert w_in.sharding.spec == P("expert", None, None)
  assert w_in.addressable_shards[0].data.shape == (1, 16, 32)
  loss8 = _eval_loss(model8, state.variables(), shard_batch(batch, mesh8))

  checkpointer = Checkpointer(tmp_path / "checkpoints")
  checkpointer.save(1, state, next_batch=3)
  checkpointer.wait()

  mesh42 = make_mesh(MeshConfig(data=4, expert=2), num_experts=E)
  restored42, next_batch = checkpointer.restore(
      with_shardings(abstract, logical_shardings(specs, abstract, mesh42)))
  assert next_batch == 3
  w_in42 = restored42.params["block_1"]["moe"]["experts"]["w_in"]
  assert w_in42.sharding.mesh == mesh42
  assert w_in42.addressable_shards[0].data.shape == (4, 16, 32)
  loss42 = _eval_loss(_model(mesh42), restored42.variables(),
                      shard_batch(batch, mesh42))

  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  restored1, _ = checkpointer.restore(
      with_shardings(abstract, jax.tree.map(lambda _: one, abstract)))
  loss1 = _eval_loss(_model(None), restored1.variables(),
                     jax.tree.map(jnp.asarray, batch))
  checkpointer.close()

  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored1), strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose([loss42, loss1], [loss8, loss8], rtol=1e-6)
