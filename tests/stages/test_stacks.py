"""Stage transforms, path rules and FLOPs counts on the encoder (top-level
blocks, as the decoder LM) and the encoder-decoder (an `encoder/` and a
`decoder/` stack of blocks, each with its own MoE placement)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import layout
from moejax.errors import ConfigError
from moejax.metrics.perf import train_flops_per_token
from moejax.models import MoEConfig, TransformerConfig, make_model
from moejax.models.config import active_ffn_flops_per_token
from moejax.pytree import match_rules, overlay, path_str, select
from moejax.routing.stablemoe import FREEZE_DISTILLED
from moejax.stages import (Stage, TransitionContext, enter_stage, diversify,
                           get_transition, upcycle)
from moejax.stages.plan import init_transform, segments
from moejax.train.optimizer import OptimizerConfig, make_optimizer
from moejax.train.state import TrainState

V, L, E = 32, 8, 4
DENSE = TransformerConfig(vocab_size=V, max_len=L, num_layers=2, d_model=16,
                          num_heads=2, d_ff=32, arch="encdec")
SOURCE = jax.random.randint(jax.random.key(7), (2, L), 0, V)
TARGET = jax.random.randint(jax.random.key(8), (2, L), 0, V)


def _moe(base=DENSE, *, encoder=(1,), decoder=(1,), router="switch", top_k=1,
         **options):
  return dataclasses.replace(
      base, moe_layers=decoder,
      encoder_moe_layers=encoder if base.arch == "encdec" else (),
      moe=MoEConfig(num_experts=E, top_k=top_k, router=router,
                    dispatch="dropless",
                    router_options=tuple(sorted(options.items()))))


def _args(cfg):
  return (SOURCE, TARGET) if cfg.arch == "encdec" else (SOURCE,)


def _variables(cfg, seed=0):
  return nn.unbox(make_model(cfg).init(jax.random.key(seed), *_args(cfg)))


def _init(cfg, seed=0):
  return _variables(cfg, seed)["params"]


def _leaves(tree):
  """{path: shape} of every leaf."""
  return {path_str(p): np.shape(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _ffn(params, stack, i):
  return params[stack][f"block_{i}"]["ffn"] if stack else params[f"block_{i}"]["ffn"]


def _experts(params, stack, i):
  block = params[stack][f"block_{i}"] if stack else params[f"block_{i}"]
  return block["moe"]["experts"]


def test_block_position_tells_the_stacks_apart():
  assert layout.block_position("block_3/ffn/w_in") == (None, 3)
  assert layout.block_position("encoder/block_3/ffn") == ("encoder", 3)
  assert layout.block_position("decoder/block_12") == ("decoder", 12)
  with pytest.raises(ConfigError, match="ambiguous"):
    layout.block_index("encoder/block_3/ffn")
  with pytest.raises(ConfigError, match="not inside a block_<i>"):
    layout.block_position("encoder/final_norm/scale")


def test_moe_ffn_rule_selects_each_stacks_own_moe_blocks():
  deeper = dataclasses.replace(DENSE, num_layers=3, num_encoder_layers=2)
  params = _init(deeper)
  moe = _moe(deeper, encoder=(1,), decoder=(0, 2))
  assert set(select(params, layout.moe_ffn_rule(moe))) == {
      "encoder/block_1/ffn", "decoder/block_0/ffn", "decoder/block_2/ffn"}
  # One stack MoE: the other stack's block of the same index is not selected.
  assert list(select(params, layout.moe_ffn_rule(_moe(encoder=())))) == [
      "decoder/block_1/ffn"]
  assert list(select(params, layout.moe_ffn_rule(_moe(decoder=())))) == [
      "encoder/block_1/ffn"]
  assert select(params, layout.moe_ffn_rule(DENSE)) == {}
  assert len(select(params, layout.DENSE_FFN)) == 2 + 3
  assert set(select(params, layout.ffn_rule(stack="encoder"))) == {
      "encoder/block_0/ffn", "encoder/block_1/ffn"}


@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_moe_ffn_rule_of_top_level_blocks_is_the_ffn_rule(arch):
  cfg = _moe(dataclasses.replace(DENSE, arch=arch, num_layers=4),
             decoder=(1, 3))
  assert layout.moe_ffn_rule(cfg) == layout.ffn_rule((1, 3)) == (
      "block_1/ffn|block_3/ffn")


@pytest.mark.parametrize("arch", ["encoder", "encdec"])
def test_diversify_keeps_the_dense_ffn_under_each_mask(arch):
  """Every expert of each MoE block is its dense FFN times a 0/1 mask (about
  the ratio zeroed, a different mask per expert and per stack); every other
  param is kept; with the router of a fresh init the tree is exactly the MoE
  model's."""
  dense_cfg = dataclasses.replace(DENSE, arch=arch)
  moe_cfg = _moe(dense_cfg)
  dense = _init(dense_cfg)
  transition, options = get_transition("diversify", {"mask_ratio": 0.3})
  out = transition.params(dense, TransitionContext(
      old=dense_cfg, new=moe_cfg, key=jax.random.key(3), options=options))
  stacks = ("encoder", "decoder") if arch == "encdec" else (None,)
  masks = []
  for stack in stacks:
    for name in ("w_in", "w_out"):
      dense_w = np.asarray(_ffn(dense, stack, 1)[name]["kernel"])
      experts_w = np.asarray(_experts(out, stack, 1)[name])
      assert experts_w.shape == (E, *dense_w.shape)
      kept = experts_w != 0
      # 4 * 16 * 32 = 2048 Bernoulli(0.3) draws: sd of the share ~0.01.
      assert abs(1 - kept.mean() - 0.3) < 0.05
      np.testing.assert_array_equal(experts_w, np.where(kept, dense_w, 0))
      for e in range(E):
        for f in range(e):
          assert (kept[e] != kept[f]).mean() > 0.3
      masks.append(kept)
  if arch == "encdec":  # Encoder and decoder block 1 draw their own masks.
    assert (masks[0] != masks[2]).mean() > 0.3
  want, got = _leaves(_init(moe_cfg, seed=1)), _leaves(out)
  router = {p for p in want if "/moe/router/" in p}
  assert router and set(got) == set(want) - router
  assert all(got[p] == want[p] for p in got)
  for path, leaf in _leaves(dense).items():
    if "/ffn/" not in path or "block_0" in path:
      np.testing.assert_array_equal(
          _get(out, path), _get(dense, path), err_msg=path)


def _get(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def test_upcycled_encdec_computes_the_dense_function():
  """mask 0: every expert a copy; under top-4 of 4 experts (gates summing to
  1) both stacks' MoE blocks compute their dense FFN."""
  dense = _init(DENSE)
  moe_cfg = _moe(router="topk", top_k=E)
  up = upcycle(dense, E, key=jax.random.key(2),
               where=layout.moe_ffn_rule(moe_cfg))
  for stack in ("encoder", "decoder"):
    for name in ("w_in", "w_out"):
      for e in range(E):
        np.testing.assert_array_equal(_experts(up, stack, 1)[name][e],
                                      _ffn(dense, stack, 1)[name]["kernel"])
  params = overlay(_init(moe_cfg, seed=1), up)
  want, _ = make_model(DENSE).apply({"params": dense}, SOURCE, TARGET)
  got, aux = make_model(moe_cfg).apply({"params": params}, SOURCE, TARGET)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert set(aux["layers"]) == {"encoder_layer_1", "decoder_layer_1"}


def _state(cfg, tx, seed):
  variables = _variables(cfg, seed)
  params = variables.pop("params")
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), model_state=variables)


def test_enter_stage_upcycles_both_stacks_of_an_encdec():
  """The stage machine on an encoder-decoder (no scanned layout): each
  stack's MoE block gets copies of its own FFN and of its Adam moments."""
  tx = make_optimizer(OptimizerConfig(), 100)
  dense = _state(DENSE, tx, 0)
  grads = jax.tree.map(jnp.ones_like, dense.params)
  _, opt_state = tx.update(grads, dense.opt_state, dense.params)
  dense = dense.replace(opt_state=opt_state)
  moe_cfg = _moe(encoder=(0,), decoder=(1,))
  stage = Stage(name="moe", steps=10, model=moe_cfg, transform="upcycle")
  state = enter_stage(dense, DENSE, stage, _state(moe_cfg, tx, 1),
                      jax.random.key(2))
  assert _leaves(state.params) == _leaves(_init(moe_cfg))
  mu_old, mu_new = dense.opt_state[2][0].mu, state.opt_state[2][0].mu
  for stack, i in (("encoder", 0), ("decoder", 1)):
    for tree, old in ((state.params, dense.params), (mu_new, mu_old)):
      for e in range(E):
        np.testing.assert_array_equal(_experts(tree, stack, i)["w_in"][e],
                                      _ffn(old, stack, i)["w_in"]["kernel"])
  np.testing.assert_array_equal(  # Not MoE in this stack: kept.
      state.params["decoder"]["block_0"]["ffn"]["w_in"]["kernel"],
      dense.params["decoder"]["block_0"]["ffn"]["w_in"]["kernel"])


def test_encdec_has_no_scanned_layout():
  params = _init(DENSE)
  assert layout.from_model(params, DENSE) is params
  assert layout.to_model(params, DENSE) is params
  with pytest.raises(ConfigError, match="no scanned layout"):
    layout.scanned(params, dataclasses.replace(DENSE, scan_layers=True))


def test_freeze_distilled_selects_both_stacks_distilled_routers():
  cfg = _moe(encoder=(1,), decoder=(0,), router="stablemoe", distill_dim=8)
  params = _init(cfg)
  hits = match_rules(params, [FREEZE_DISTILLED])
  frozen = {path_str(p) for p, hit in jax.tree_util.tree_leaves_with_path(hits)
            if hit}
  assert frozen == {f"{block}/moe/router/distill_{name}"
                    for block in ("encoder/block_1", "decoder/block_0")
                    for name in ("embedding", "centroids")}
  tx = make_optimizer(OptimizerConfig(learning_rate=0.1, warmup_steps=0), 10,
                      frozen=(FREEZE_DISTILLED,))
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params),
                         params)
  for path in _leaves(params):
    assert bool(np.any(_get(updates, path))) == (path not in frozen), path


def test_stage_plan_sees_moe_in_the_encoder_stack_only():
  cfg = _moe(decoder=(), router="dts", hard_step=3)
  assert cfg.has_moe and not _moe(encoder=(), decoder=()).has_moe
  (_, soft), (second, hard) = segments(Stage(name="s", steps=6, model=cfg))
  assert soft is cfg and second == 3
  assert dict(hard.moe.router_options)["hard_step"] == -1
  assert init_transform(_moe(decoder=(), router="hash",
                             balance="frequency")) is not None


def test_flops_count_both_stacks_by_hand():
  cfg = dataclasses.replace(
      _moe(dataclasses.replace(DENSE, num_layers=3, num_encoder_layers=2),
           encoder=(1,), decoder=(0,), top_k=2),
      moe=MoEConfig(num_experts=4, top_k=2, d_ff=16))
  # D=16, F=32, F_e=16. Encoder: dense block 0 4*16*32 = 2048, MoE block 1
  # 2 experts * 4*16*16 = 2048. Decoder: MoE block 0 2048, dense 1, 2: 4096.
  assert active_ffn_flops_per_token(cfg) == 2048 * 5
  # Decoder-only count of the same decoder stack: 2048 * 3.
  assert active_ffn_flops_per_token(dataclasses.replace(
      cfg, arch="decoder", encoder_moe_layers=())) == 2048 * 3
  # Matmul params per (source, target) token pair, D=16 (D^2=256):
  # encoder attention 2 * 4*256 = 2048; decoder self + cross attention
  # 3 * 8*256 = 6144; dense FFNs 3 * 2*16*32 = 3072; MoE blocks 2 * (router
  # 16*4 + 2 experts * 2*16*16) = 2 * 1088 = 2176; logits 32*16 = 512.
  # Total 13952. Attention scores, source 6, target 8: encoder 2 * 12*16*6 =
  # 2304, decoder 3 * 12*16*(8 + 6) = 8064.
  assert train_flops_per_token(cfg, 8, source_len=6) == (
      6 * 13952 + 2304 + 8064)
