"""Cached decoding: the same logits as the full forward pass, reproducible samples."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.errors import ConfigError
from moejax.models import MoEConfig, TransformerConfig, TransformerLM
from moejax.models.decode import Decoder, decoding_config, sample_token
from moejax.parallel import MeshConfig, logical_shardings, make_mesh

V, MAX_LEN, P = 64, 16, 5


def _config(router="switch", dispatch="capacity", top_k=1, options=(),
            moe_layers=(1,)):
  return TransformerConfig(
      vocab_size=V, max_len=MAX_LEN, num_layers=2, d_model=32, num_heads=2,
      d_ff=64, moe_layers=moe_layers,
      moe=MoEConfig(num_experts=4, top_k=top_k, router=router,
                    router_options=tuple(options), dispatch=dispatch))


def _boxed(config):
  tokens_BL = jnp.zeros((1, MAX_LEN), jnp.int32)
  return jax.jit(TransformerLM(config).init)(jax.random.key(0), tokens_BL)


@functools.cache
def _variables(config):
  return nn.unbox(_boxed(config))


@functools.cache
def _decoder(config):
  return Decoder(config)


def _cached_logits(decoder, variables, tokens_BL):
  """Prefill P tokens, then feed the rest one at a time."""
  cache, logits, experts = decoder.extend(variables, None, tokens_BL[:, :P])
  all_logits, all_experts = [logits], [experts]
  for t in range(P, tokens_BL.shape[1]):
    cache, logits, experts = decoder.extend(variables, cache,
                                            tokens_BL[:, t:t + 1])
    all_logits.append(logits)
    all_experts.append(experts)
  return (np.concatenate(all_logits, axis=1),
          {k: np.concatenate([e[k] for e in all_experts], axis=1)
           for k in all_experts[0]})


CASES = {
    "switch-capacity": _config("switch", "capacity"),
    "top2-dropless": _config("topk", "dropless", top_k=2),
    "hash-capacity": _config("hash", "capacity"),
    "stablemoe-frozen-dropless": _config(
        "stablemoe", "dropless", options=(("distill_dim", 8), ("stage", 2))),
    "dense": _config(moe_layers=()),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cached_decoding_equals_the_full_forward_pass(name):
  config = CASES[name]
  variables = _variables(config)
  tokens_BL = jax.random.randint(jax.random.key(1), (3, MAX_LEN), 0, V)
  full_logits, aux = jax.jit(TransformerLM(decoding_config(config)).apply)(
      variables, tokens_BL)
  logits, experts = _cached_logits(_decoder(config), variables, tokens_BL)
  np.testing.assert_allclose(logits, full_logits, rtol=1e-5, atol=1e-5)
  assert set(experts) == {f"layer_{i}" for i in config.moe_layers}
  for layer, route_T in aux["routes"].items():
    np.testing.assert_array_equal(experts[layer], route_T.reshape(3, MAX_LEN))


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_cached_decoding_on_a_mesh_equals_one_device(dispatch):
  config = _config("topk", dispatch, top_k=2)
  variables = _variables(config)
  mesh = make_mesh(MeshConfig(data=2, expert=4), num_experts=4)
  specs = nn.get_partition_spec(jax.eval_shape(lambda: _boxed(config)))
  placed = jax.device_put(variables,
                          logical_shardings(specs, variables, mesh))
  tokens_BL = jax.random.randint(jax.random.key(2), (8, MAX_LEN), 0, V)
  full_logits, _ = jax.jit(TransformerLM(decoding_config(config)).apply)(
      variables, tokens_BL)
  decoder = Decoder(config, mesh=mesh)
  assert decoder.row_multiple == 8
  logits, _ = _cached_logits(decoder, placed, tokens_BL)
  np.testing.assert_allclose(logits, full_logits, rtol=1e-5, atol=1e-5)
  if dispatch == "capacity":
    return
  # One prompt row is padded to 8 and gives the one-device greedy text.
  prompt = np.asarray(tokens_BL[:1, :P])
  on_mesh = decoder.generate(placed, prompt, max_new_tokens=6,
                             key=jax.random.key(0), temperature=0.0)
  alone = _decoder(config).generate(variables, prompt, max_new_tokens=6,
                                   key=jax.random.key(0), temperature=0.0)
  np.testing.assert_array_equal(on_mesh.tokens_BY, alone.tokens_BY)
  assert on_mesh.tokens_BY.shape == (1, 6)


def test_greedy_generation_follows_the_full_forward_argmax():
  config = CASES["top2-dropless"]
  variables = _variables(config)
  prompt = np.asarray(jax.random.randint(jax.random.key(3), (1, P), 0, V))
  out = _decoder(config).generate(variables, prompt, max_new_tokens=6,
                                  key=jax.random.key(0), temperature=0.0)
  seq_BL = np.concatenate([prompt, out.tokens_BY], axis=1)
  logits, aux = jax.jit(TransformerLM(decoding_config(config)).apply)(
      variables, seq_BL)
  np.testing.assert_array_equal(out.tokens_BY,
                                np.argmax(logits[:, P - 1:-1], axis=-1))
  for layer, route_T in aux["routes"].items():  # The experts of every token.
    np.testing.assert_array_equal(out.experts[layer], route_T.reshape(1, -1))


def test_a_fixed_seed_reproduces_the_sample():
  config = CASES["hash-capacity"]
  variables = _variables(config)
  decoder = _decoder(config)
  prompt = np.zeros((2, 3), np.int32)
  runs = [decoder.generate(variables, prompt, max_new_tokens=12,
                           key=jax.random.key(seed), temperature=1.0, top_p=0.9)
          for seed in (7, 7, 8)]
  np.testing.assert_array_equal(runs[0].tokens_BY, runs[1].tokens_BY)
  assert not np.array_equal(runs[0].tokens_BY, runs[2].tokens_BY)


def test_sample_token_draws_from_the_nucleus():
  logits_V = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
  logits_BV = jnp.broadcast_to(logits_V, (20_000, 4))
  key = jax.random.key(0)
  full = np.bincount(sample_token(logits_BV, key, 1.0, 1.0), minlength=4) / 20_000
  np.testing.assert_allclose(full, [0.5, 0.3, 0.15, 0.05], atol=0.015)
  # top_p=0.7: the nucleus is {0, 1} (mass before token 1 is 0.5 < 0.7, before
  # token 2 is 0.8), renormalised to 0.625 / 0.375.
  nucleus = np.bincount(sample_token(logits_BV, key, 1.0, 0.7), minlength=4) / 20_000
  np.testing.assert_allclose(nucleus, [0.625, 0.375, 0, 0], atol=0.015)
  np.testing.assert_array_equal(sample_token(logits_BV[:3], key, 0.0, 1.0), 0)


def test_too_long_a_generation_is_a_one_line_error():
  config = CASES["switch-capacity"]
  with pytest.raises(ConfigError, match="use at most 11 new tokens"):
    _decoder(config).generate(_variables(config), np.zeros((1, 5), np.int32),
                             max_new_tokens=12, key=jax.random.key(0))


def test_decoding_config_keeps_every_slot():
  config = decoding_config(_config("topk", top_k=2))
  assert config.moe.capacity_factor == 4.0
  assert dataclasses.replace(config.moe, capacity_factor=1.25) == _config(
      "topk", top_k=2).moe
