"""Scanned blocks and remat: the same function as unrolled blocks, params
converted by `moejax.layout`, for placements that scan as one or several stacks."""

import dataclasses
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import layout
from moejax.errors import ConfigError
from moejax.models.config import MoEConfig, TransformerConfig
from moejax.models.transformer import TransformerLM, init_variables


@pytest.mark.parametrize("num_layers", range(1, 9))
def test_stacks_cover_every_block_in_order(num_layers):
  for moe in itertools.chain.from_iterable(
      itertools.combinations(range(num_layers), n) for n in range(num_layers + 1)):
    plan = layout.stacks(num_layers, moe)
    blocks = [st.block(r, k) for st in plan for r in range(st.repeats)
              for k in range(len(st.unit))]
    assert blocks == list(range(num_layers))
    assert [st.unit[k] for st in plan for r in range(st.repeats)
            for k in range(len(st.unit))] == [i in moe for i in blocks]


def test_periodic_placements_are_one_stack():
  assert layout.stacks(24, range(1, 24, 2)) == (layout.Stack(0, (False, True), 12),)
  assert len(layout.stacks(24, (12,))) == 3
  assert layout.stacks(12, ()) == (layout.Stack(0, (False,), 12),)


def _config(moe_layers, **moe):
  return TransformerConfig(
      vocab_size=64, max_len=16, num_layers=5, d_model=32, num_heads=2,
      d_ff=64, moe_layers=moe_layers, moe=MoEConfig(num_experts=4, d_ff=64, **moe))


def _loss_and_grads(config, variables, tokens_BL):
  def loss(params):
    logits_BLV, aux = TransformerLM(config).apply(
        {**variables, "params": params}, tokens_BL)
    return jnp.mean(jax.nn.log_softmax(logits_BLV)[..., 0]) + aux["aux_loss"], aux
  return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])


# Each placement (a periodic unit, one MoE block among dense ones, every block
# MoE) once, each with another remat policy: remat wraps every scanned unit
# alike, whatever the unit holds.
@pytest.mark.parametrize("moe_layers,moe,remat", [
    ((1, 3), {}, "none"),
    ((2,), dict(dispatch="dropless", router="topk", top_k=2), "full"),
    ((0, 1, 2, 3, 4), dict(router="hash"), "dots_no_batch"),
    ((1, 3), dict(dispatch="dropless"), "dots"),
])
def test_scanned_equals_unrolled(moe_layers, moe, remat):
  config = _config(moe_layers, **moe)
  scan_config = dataclasses.replace(config, scan_layers=True, remat=remat)
  tokens_BL = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
  variables = init_variables(TransformerLM(config), jax.random.key(0), tokens_BL)
  scan_variables = init_variables(TransformerLM(scan_config), jax.random.key(0),
                                  tokens_BL)
  assert "block_0" not in scan_variables["params"]
  jax.tree.map(np.testing.assert_array_equal,
               layout.unrolled(scan_variables, scan_config), variables)
  # The scanned model's own init has the same tree and shapes.
  own = nn.unbox(jax.eval_shape(TransformerLM(scan_config).init,
                                jax.random.key(0), tokens_BL))
  assert jax.tree.map(jnp.shape, own) == jax.tree.map(jnp.shape, dict(scan_variables))

  (loss, aux), grads = _loss_and_grads(config, variables, tokens_BL)
  (scan_loss, scan_aux), scan_grads = _loss_and_grads(scan_config,
                                                      scan_variables, tokens_BL)
  np.testing.assert_allclose(scan_loss, loss, rtol=1e-6)
  assert sorted(scan_aux["routes"]) == sorted(aux["routes"])
  jax.tree.map(np.testing.assert_array_equal, scan_aux["routes"], aux["routes"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               layout.unrolled(scan_grads, scan_config), grads)


def test_scanned_decoding_equals_unrolled():
  from moejax.models.decode import Decoder  # pylint: disable=g-import-not-at-top
  config = _config((1, 3))
  scan_config = dataclasses.replace(config, scan_layers=True)
  tokens_BL = jnp.zeros((1, 4), jnp.int32)
  variables = init_variables(TransformerLM(config), jax.random.key(0), tokens_BL)
  outs = []
  for cfg, v in ((config, variables), (scan_config, layout.scanned(variables, scan_config))):
    gen = Decoder(cfg).generate(v, np.array([[1, 2, 3]]), max_new_tokens=6,
                                key=jax.random.key(2))
    outs.append(gen)
  np.testing.assert_array_equal(outs[0].tokens_BY, outs[1].tokens_BY)
  jax.tree.map(np.testing.assert_array_equal, outs[0].experts, outs[1].experts)


def test_unknown_remat_is_one_line():
  config = dataclasses.replace(_config((1,)), remat="some")
  with pytest.raises(ConfigError, match="model.remat='some'"):
    TransformerLM(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
