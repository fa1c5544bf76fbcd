"""Stage transforms: what each preserves."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.errors import ConfigError
from moejax.layout import ffn_rule
from moejax.models import MoEConfig, TransformerConfig, TransformerLM
from moejax.pytree import overlay
from moejax.stages import Stage, carry_opt_state, diversify, enter_stage
from moejax.train.program import init_state
from moejax.train.optimizer import OptimizerConfig, make_optimizer

DENSE = TransformerConfig(vocab_size=64, max_len=16, num_layers=2, d_model=32,
                          num_heads=2, d_ff=48)


def _moe(router: str, top_k: int, dispatch: str = "dropless", **options):
  return dataclasses.replace(DENSE, moe_layers=(1,), moe=MoEConfig(
      num_experts=4, top_k=top_k, router=router, dispatch=dispatch,
      capacity_factor=8.0, router_options=tuple(sorted(options.items()))))


def _init(cfg, seed=0):
  tokens = jnp.zeros((1, 16), jnp.int32)
  return nn.unbox(TransformerLM(cfg).init(jax.random.key(seed), tokens))["params"]


TOKENS = jax.random.randint(jax.random.key(9), (2, 16), 0, 64)


@pytest.mark.parametrize("moe_cfg,kwargs", [
    # Top-4 of 4 experts, renormalised: the gates sum to 1.
    (_moe("topk", 4, "dropless"), {}),
    (_moe("topk", 4, "capacity"), {}),
    # The DTS gate in training with threshold 0: every expert, Gumbel weights sum to 1.
    (_moe("dts", 1, "dropless", threshold=0.0, tau_max=2.0), {
        "deterministic": False, "step": jnp.asarray(3),
        "rngs": {"router": jax.random.key(5)}}),
])
def test_diversify_without_mask_computes_the_dense_function(moe_cfg, kwargs):
  dense_params = _init(DENSE)
  moe_params = overlay(_init(moe_cfg, seed=1),
                       diversify(dense_params, 4, 0.0, jax.random.key(2),
                                 where=ffn_rule(moe_cfg.moe_layers)))
  want, _ = TransformerLM(DENSE).apply({"params": dense_params}, TOKENS)
  got, aux = TransformerLM(moe_cfg).apply({"params": moe_params}, TOKENS, **kwargs)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert float(aux["layers"]["layer_1"]["drop_frac"]) == 0.0


def test_diversify_masks_are_independent_and_match_the_ratio():
  params = _init(DENSE)
  out = diversify(params, 4, 0.3, jax.random.key(0), where=ffn_rule((1,)))
  assert "ffn" not in out["block_1"] and "ffn" in out["block_0"]
  dense_w = np.asarray(params["block_1"]["ffn"]["w_in"]["kernel"])
  experts_w = np.asarray(out["block_1"]["moe"]["experts"]["w_in"])
  assert experts_w.shape == (4, *dense_w.shape)
  zero = experts_w == 0
  # 4 * 32 * 48 = 6144 Bernoulli(0.3) draws: sd of the share is ~0.006.
  assert abs(zero.mean() - 0.3) < 0.03
  for e in range(4):
    np.testing.assert_array_equal(experts_w[e][~zero[e]], dense_w[~zero[e]])
    for f in range(e):
      assert (zero[e] != zero[f]).mean() > 0.3  # Independent masks differ a lot.
  np.testing.assert_array_equal(out["block_0"]["ffn"]["w_in"]["kernel"],
                                params["block_0"]["ffn"]["w_in"]["kernel"])


def test_diversify_selects_ffns_by_rule_and_keys_masks_by_block():
  """A predicate selects like a regex; block i's masks come from fold_in(key, i)
  whatever else is selected, so choosing layers does not reshuffle masks."""
  params = _init(dataclasses.replace(DENSE, num_layers=3))
  key = jax.random.key(4)
  every = diversify(params, 2, 0.5, key)
  one = diversify(params, 2, 0.5, key,
                  where=lambda path: path == "block_2/ffn")
  assert "ffn" in one["block_0"] and "ffn" in one["block_1"]
  assert all("ffn" not in every[f"block_{i}"] for i in range(3))
  np.testing.assert_array_equal(one["block_2"]["moe"]["experts"]["w_out"],
                                every["block_2"]["moe"]["experts"]["w_out"])
  kernel = one["block_0"]["attn"]["qkv"]["kernel"]
  assert kernel is params["block_0"]["attn"]["qkv"]["kernel"]  # Unselected: kept.
  with pytest.raises(ConfigError, match="must select dense FFNs"):
    diversify(params, 2, 0.5, key, where=r"block_1/ffn/w_in")


def test_overlay_rejects_a_shape_change():
  with pytest.raises(ValueError, match="a/b: shape"):
    overlay({"a": {"b": jnp.zeros((2,))}}, {"a": {"b": jnp.zeros((3,))}})


@pytest.mark.parametrize("moments", ["replicate", "reset"])
def test_enter_stage_carries_the_optimizer_state(moments):
  tx = make_optimizer(OptimizerConfig(), 100)
  dense = init_state(TransformerLM(DENSE), tx, jax.random.key(0), 16)
  # One real update so the moments are non-zero.
  grads = jax.tree.map(jnp.ones_like, dense.params)
  updates, opt_state = tx.update(grads, dense.opt_state, dense.params)
  dense = dense.replace(params=optax.apply_updates(dense.params, updates),
                        opt_state=opt_state, step=jnp.asarray(1))
  moe_cfg = _moe("switch", 1)
  stage = Stage(name="moe", steps=10, model=moe_cfg, transform="diversify",
                transform_options=(("mask_ratio", 0.0), ("moments", moments)))
  fresh = init_state(TransformerLM(moe_cfg), tx, jax.random.key(1), 16)
  state = enter_stage(dense, DENSE, stage, fresh, jax.random.key(2))
  mu_old = dense.opt_state[2][0].mu
  mu_new = state.opt_state[2][0].mu
  assert int(state.opt_state[2][0].count) == 1  # Adam's step count continues.
  np.testing.assert_array_equal(mu_new["block_0"]["attn"]["qkv"]["kernel"],
                                mu_old["block_0"]["attn"]["qkv"]["kernel"])
  experts_mu = np.asarray(mu_new["block_1"]["moe"]["experts"]["w_in"])
  if moments == "replicate":
    for e in range(4):
      np.testing.assert_array_equal(
          experts_mu[e], mu_old["block_1"]["ffn"]["w_in"]["kernel"])
  else:
    assert not experts_mu.any()
  # The new router's moments start at zero.
  assert not np.asarray(mu_new["block_1"]["moe"]["router"]["gate"]["kernel"]).any()


def test_carry_opt_state_keeps_an_unchanged_tree():
  tx = make_optimizer(OptimizerConfig(), 100)
  state = init_state(TransformerLM(DENSE), tx, jax.random.key(0), 16)
  bumped = jax.tree.map(lambda x: x + 1, state.opt_state)
  carried = carry_opt_state(bumped, state.params, state.opt_state, state.params,
                            lambda tree: tree)
  for a, b in zip(jax.tree.leaves(carried), jax.tree.leaves(bumped)):
    np.testing.assert_array_equal(a, b)
