"""Autoregressive generation with a KV cache over `TransformerLM`.

Shapes: B batch rows generated together, L length of one call (the prompt's for
the first), Y steps (one new token each), V vocabulary.

`Decoder(config, mesh=None)` runs the model in decode mode: `extend` appends
tokens to a cache of keys and values (the first call, with no cache, is the
prefill) and returns their logits and experts; `generate` samples Y tokens in
one jitted program (a `lax.scan` over steps). Routing is as at evaluation.

Decoding is causal only if a token's output does not depend on the other
tokens of its call, so the capacity path decodes with room for every slot
(C = T * K: nothing is dropped). Where the training capacity drops no token,
the cached logits equal the full forward pass's (tested). Expert choice picks
tokens among those of one call, so decoding only approximates its full pass.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax.errors import ConfigError
from moejax.models.config import TransformerConfig
from moejax.models.transformer import TransformerLM
from moejax.parallel.rules import TOKEN_AXES, shard_batch

Cache = dict[str, Any]


def decoding_config(config: TransformerConfig) -> TransformerConfig:
  """`config` with a capacity factor of E, so the capacity path keeps every slot."""
  moe = dataclasses.replace(config.moe,
                            capacity_factor=float(config.moe.num_experts))
  return dataclasses.replace(config, moe=moe)


def sample_token(logits_BV: jax.Array, key: jax.Array, temperature: jax.Array,
                 top_p: jax.Array) -> jax.Array:
  """int32[B]: a draw from softmax(logits / temperature) restricted to the
  smallest set of most likely tokens whose mass reaches top_p (nucleus);
  temperature 0 is greedy (argmax)."""
  logits_BV = logits_BV.astype(jnp.float32)
  greedy_B = jnp.argmax(logits_BV, axis=-1)
  scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)
  order_BV = jnp.argsort(-scaled_BV, axis=-1)
  sorted_BV = jnp.take_along_axis(scaled_BV, order_BV, axis=-1)
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  kept_BV = mass_before_BV < top_p  # The most likely token is always kept.
  choice_B = jax.random.categorical(key, jnp.where(kept_BV, sorted_BV, -jnp.inf))
  sampled_B = jnp.take_along_axis(order_BV, choice_B[:, None], axis=-1)[:, 0]
  return jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Generation:
  """What `Decoder.generate` returns (numpy, the padding rows removed).

  Attributes:
    tokens_BY: int32[B, Y] the generated ids.
    experts: `layer_<i>` -> int32[B, L + Y] the top expert that served each
      prompt and generated token in MoE block i (-1: no expert).
  """

  tokens_BY: np.ndarray
  experts: dict[str, np.ndarray]


class Decoder:
  """Jitted cached decoding of a `TransformerLM` config.

  With a `mesh` the MoE layers run expert-parallel; rows are padded to a
  multiple of the devices that split tokens (and the padding dropped).
  """

  def __init__(self, config: TransformerConfig, *,
               mesh: jax.sharding.Mesh | None = None):
    self.config = decoding_config(config)
    self.mesh = mesh if mesh is not None and mesh.size > 1 else None
    self.model = TransformerLM(self.config, mesh=self.mesh, decode=True)
    self._extend = jax.jit(self._extend_fn)
    self._generate = jax.jit(self._generate_fn, static_argnames=("steps",))

  @property
  def row_multiple(self) -> int:
    """Rows must be a multiple of this (devices splitting the tokens)."""
    if self.mesh is None:
      return 1
    return int(np.prod([self.mesh.shape[a] for a in TOKEN_AXES]))

  def _extend_fn(self, variables, cache, tokens_BL):
    inputs = {k: v for k, v in variables.items() if k != "cache"}
    if cache is not None:
      inputs["cache"] = cache
    (logits_BLV, aux), updated = self.model.apply(
        inputs, tokens_BL, deterministic=True, mutable=["cache"])
    batch, length = tokens_BL.shape
    experts = {k: v.reshape(batch, length) for k, v in aux["routes"].items()}
    return updated["cache"], logits_BLV, experts

  def extend(self, variables, cache: Cache | None, tokens_BL
             ) -> tuple[Cache, jax.Array, dict[str, jax.Array]]:
    """Appends L tokens: (new cache, logits [B, L, V], experts {layer: [B, L]}).

    `cache=None` starts a sequence. B must be a multiple of `row_multiple`.
    """
    tokens_BL = jnp.asarray(tokens_BL, jnp.int32)
    if self.mesh is not None:
      tokens_BL = shard_batch(tokens_BL, self.mesh)
    return self._extend(variables, cache, tokens_BL)

  def _generate_fn(self, variables, prompt_BL, key, temperature, top_p, *,
                   steps):
    cache, logits_BLV, prompt_experts = self._extend_fn(variables, None,
                                                        prompt_BL)

    def one(carry, key_t):
      cache, logits_BV = carry
      token_B = sample_token(logits_BV, key_t, temperature, top_p)
      cache, logits_B1V, experts = self._extend_fn(variables, cache,
                                                   token_B[:, None])
      return (cache, logits_B1V[:, 0]), (token_B, experts)

    _, (tokens_YB, experts_Y) = jax.lax.scan(
        one, (cache, logits_BLV[:, -1]), jax.random.split(key, steps))
    experts = {k: jnp.concatenate([v, experts_Y[k][:, :, 0].T], axis=1)
               for k, v in prompt_experts.items()}
    return tokens_YB.T, experts

  def generate(self, variables, prompt_BL, *, max_new_tokens: int,
               key: jax.Array, temperature: float = 1.0,
               top_p: float = 1.0) -> Generation:
    """Samples `max_new_tokens` tokens after each prompt row (same lengths).

    ConfigError when L + Y exceeds the model's max_len or a setting is out of
    range; the same key gives the same tokens.
    """
    prompt_BL = np.asarray(prompt_BL, np.int32)
    if prompt_BL.ndim != 2 or prompt_BL.shape[1] < 1:
      raise ConfigError(f"prompt must be int[B, L] with L >= 1, got shape "
                        f"{prompt_BL.shape}")
    rows, length = prompt_BL.shape
    if max_new_tokens < 1 or length + max_new_tokens > self.config.max_len:
      raise ConfigError(
          f"a prompt of {length} tokens + max_new_tokens={max_new_tokens} must "
          f"fit the model's max_len={self.config.max_len} (data.seq_len of the "
          f"run) with max_new_tokens >= 1; use at most "
          f"{self.config.max_len - length} new tokens or a shorter prompt")
    if temperature < 0 or not 0 < top_p <= 1:
      raise ConfigError(f"temperature={temperature} must be >= 0 and top_p="
                        f"{top_p} in (0, 1]")
    pad = -rows % self.row_multiple
    padded_BL = np.concatenate([prompt_BL, np.repeat(prompt_BL[:1], pad, 0)])
    if self.mesh is not None:
      padded_BL = shard_batch(padded_BL, self.mesh)
    tokens_BY, experts = jax.device_get(self._generate(
        variables, padded_BL, key, jnp.float32(temperature), jnp.float32(top_p),
        steps=max_new_tokens))
    return Generation(tokens_BY=np.asarray(tokens_BY[:rows]),
                      experts={k: np.asarray(v[:rows]) for k, v in experts.items()})
