"""Greedy and beam search over the encoder-decoder, with its KV cache.

Shapes: B batch (source rows), L length (of the source), D model width, K
top-k hypotheses kept per row (the beams), Y steps (target tokens generated),
V vocabulary.

Each search is one jitted program: the source is encoded once, the decoder's
keys and values (and the encoder output's, `moejax.models.encdec.extend`) stay
in the cache, and a `lax.while_loop` appends one token per step until every
row has emitted EOS or `max_steps` tokens. Tokens after a row's EOS are
`pad_id`. Routing is as at evaluation (no router rng); pass a model built from
`moejax.models.decode.decoding_config` so the capacity path keeps every slot.

Beam search keeps K hypotheses per row, scored by their summed log
probabilities. A hypothesis that has emitted EOS stays in the beam with its
score frozen (it extends only by padding, at log probability 0) and competes
with the open ones on that score; at the end the best of the K by score /
lp(length) is returned, lp the length penalty of Wu et al. (2016),
((5 + length) / 6) ** alpha (alpha 0: raw scores), length counting EOS.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax.models.encdec import EncoderDecoder, extend


def length_penalty(lengths: jax.Array, alpha: float) -> jax.Array:
  """Wu et al.'s ((5 + length) / 6) ** alpha, float32 like `lengths`."""
  return ((5.0 + lengths.astype(jnp.float32)) / 6.0) ** alpha


def _check(model: nn.Module, max_steps: int, beam_size: int) -> None:
  if not isinstance(model, EncoderDecoder):
    raise ConfigError("search decodes an encoder-decoder (model.arch='encdec'); "
                      f"got {type(model).__name__}")
  if not 1 <= max_steps < model.config.max_len:
    raise ConfigError(f"max_steps={max_steps} must be in 1..model.max_len - 1 "
                      f"= {model.config.max_len - 1} (BOS takes a position)")
  if beam_size < 1:
    raise ConfigError(f"beam_size must be >= 1, got {beam_size}")


def _encode(model, variables, source_BL, source_segments_BL):
  encoded_BLD, _ = model.apply(variables, source_BL,
                               source_segments_BL=source_segments_BL,
                               method=EncoderDecoder.encode)
  return encoded_BLD


@functools.partial(jax.jit, static_argnames=("model", "max_steps", "bos_id",
                                             "eos_id", "pad_id"))
def greedy_search(model: EncoderDecoder, variables: dict, source_BL: jax.Array,
                  source_segments_BL: jax.Array | None = None, *,
                  max_steps: int, bos_id: int, eos_id: int, pad_id: int = 0
                  ) -> jax.Array:
  """int32[B, Y]: each step's most probable token (Y = max_steps), `pad_id`
  after EOS. `source_segments_BL`: 1 at source tokens, 0 at padding."""
  _check(model, max_steps, 1)
  batch = source_BL.shape[0]
  decoder = model.clone(decode=True)
  encoded_BLD = _encode(model, variables, source_BL, source_segments_BL)
  bos_B1 = jnp.full((batch, 1), bos_id, jnp.int32)
  cache, logits_B1V, _ = extend(decoder, variables, None, bos_B1, encoded_BLD,
                                source_segments_BL)

  def cond(carry):
    t, _, _, done_B, _ = carry
    return (t < max_steps) & ~jnp.all(done_B)

  def body(carry):
    t, cache, logits_B1V, done_B, out_BY = carry
    token_B = jnp.argmax(logits_B1V[:, 0], axis=-1).astype(jnp.int32)
    token_B = jnp.where(done_B, pad_id, token_B)
    out_BY = out_BY.at[:, t].set(token_B)
    done_B = done_B | (token_B == eos_id)
    cache, logits_B1V, _ = extend(decoder, variables, cache, token_B[:, None])
    return t + 1, cache, logits_B1V, done_B, out_BY

  out_BY = jnp.full((batch, max_steps), pad_id, jnp.int32)
  done_B = jnp.zeros((batch,), bool)
  *_, out_BY = jax.lax.while_loop(
      cond, body, (jnp.int32(0), cache, logits_B1V, done_B, out_BY))
  return out_BY


def _beam_rows(tree, flat_rows, rows: int):
  """Every leaf of the cache with `rows` leading rows, reordered to
  `flat_rows` (the source beam of each new beam); others (positions) kept."""
  return jax.tree.map(
      lambda a: a[flat_rows] if a.ndim and a.shape[0] == rows else a, tree)


@functools.partial(jax.jit, static_argnames=(
    "model", "max_steps", "beam_size", "bos_id", "eos_id", "pad_id", "alpha"))
def beam_search(model: EncoderDecoder, variables: dict, source_BL: jax.Array,
                source_segments_BL: jax.Array | None = None, *,
                max_steps: int, beam_size: int, bos_id: int, eos_id: int,
                pad_id: int = 0, alpha: float = 0.6
                ) -> tuple[jax.Array, jax.Array]:
  """(int32[B, Y] best hypothesis per row, float32[B] its summed log
  probability), K = beam_size hypotheses per row, length penalty `alpha`."""
  _check(model, max_steps, beam_size)
  batch, k = source_BL.shape[0], beam_size
  rows = batch * k
  decoder = model.clone(decode=True)
  encoded_BLD = _encode(model, variables, source_BL, source_segments_BL)
  # Row b * K + j of every [B * K, ...] array is beam j of source row b.
  repeat = functools.partial(jnp.repeat, repeats=k, axis=0)
  segments = None if source_segments_BL is None else repeat(source_segments_BL)
  bos = jnp.full((rows, 1), bos_id, jnp.int32)
  cache, logits, _ = extend(decoder, variables, None, bos, repeat(encoded_BLD),
                            segments)
  vocab = logits.shape[-1]
  # The K beams start equal: only beam 0 may extend at the first step.
  scores_BK = jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf), (batch, 1))
  tokens_BKY = jnp.full((batch, k, max_steps), pad_id, jnp.int32)
  done_BK = jnp.zeros((batch, k), bool)
  lengths_BK = jnp.zeros((batch, k), jnp.int32)
  # What a finished hypothesis may append: padding, at log probability 0.
  pad_only_V = jnp.where(jnp.arange(vocab) == pad_id, 0.0, -jnp.inf)

  def cond(carry):
    t, *_, done_BK, _ = carry
    return (t < max_steps) & ~jnp.all(done_BK)

  def body(carry):
    t, cache, logits, scores_BK, tokens_BKY, done_BK, lengths_BK = carry
    logp_BKV = jax.nn.log_softmax(
        logits[:, 0].astype(jnp.float32)).reshape(batch, k, vocab)
    logp_BKV = jnp.where(done_BK[..., None], pad_only_V, logp_BKV)
    candidates = (scores_BK[..., None] + logp_BKV).reshape(batch, k * vocab)
    scores_BK, flat_BK = jax.lax.top_k(candidates, k)
    beam_BK, token_BK = flat_BK // vocab, (flat_BK % vocab).astype(jnp.int32)
    take = functools.partial(jnp.take_along_axis, indices=beam_BK, axis=1)
    was_done_BK = take(done_BK)
    tokens_BKY = jnp.take_along_axis(tokens_BKY, beam_BK[..., None], axis=1)
    tokens_BKY = tokens_BKY.at[:, :, t].set(token_BK)
    lengths_BK = take(lengths_BK) + (~was_done_BK).astype(jnp.int32)
    done_BK = was_done_BK | (token_BK == eos_id)
    flat_rows = (jnp.arange(batch)[:, None] * k + beam_BK).reshape(rows)
    cache = _beam_rows(cache, flat_rows, rows)
    cache, logits, _ = extend(decoder, variables, cache,
                              token_BK.reshape(rows, 1))
    return t + 1, cache, logits, scores_BK, tokens_BKY, done_BK, lengths_BK

  carry = (jnp.int32(0), cache, logits, scores_BK, tokens_BKY, done_BK,
           lengths_BK)
  _, _, _, scores_BK, tokens_BKY, _, lengths_BK = jax.lax.while_loop(
      cond, body, carry)
  best_B = jnp.argmax(scores_BK / length_penalty(lengths_BK, alpha), axis=1)
  pick = lambda a: jnp.take_along_axis(  # noqa: E731
      a, best_B.reshape((batch,) + (1,) * (a.ndim - 1)), axis=1)[:, 0]
  return pick(tokens_BKY), pick(scores_BK)
