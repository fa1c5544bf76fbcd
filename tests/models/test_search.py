"""Greedy and beam search over the encoder-decoder against naive searches
that run the full (uncached) model on every prefix; padding in the source
changes nothing; bad settings are one-line errors.

Shapes: B batch, L length, K top-k hypotheses (the beams), V vocabulary.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.errors import ConfigError
from moejax.models import MoEConfig, TransformerConfig, make_model
from moejax.models.decode import decoding_config
from moejax.models.search import beam_search, greedy_search, length_penalty

V, MAX_LEN, S, STEPS, BOS = 24, 9, 7, 6, 1


@functools.cache
def _setup():
  config = decoding_config(TransformerConfig(
      vocab_size=V, max_len=MAX_LEN, num_layers=2, d_model=16, num_heads=2,
      d_ff=32, arch="encdec", moe_layers=(1,), encoder_moe_layers=(0,),
      moe=MoEConfig(num_experts=4, router="switch", dispatch="capacity")))
  model = make_model(config)
  src_BL = jax.random.randint(jax.random.key(1), (3, S), 2, V)
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), src_BL,
                                           src_BL[:, :4]))
  # A more confident random model (params x3): the rows' searches differ, and
  # beams find what greedy does not.
  variables = jax.tree.map(lambda a: 3.0 * a, variables)
  # The last row is padded after 5 tokens.
  segments_BL = jnp.asarray([[1] * S, [1] * S, [1] * 5 + [0] * 2], jnp.int32)
  return model, variables, src_BL, segments_BL


@functools.cache
def _full(model):
  return jax.jit(lambda v, s, t, seg: model.apply(
      v, s, t, source_segments_BL=seg)[0])


def _next_logp(prefixes, row):
  """log p(next token) [N, V] after each prefix (lists starting with BOS) of
  source row `row`, from the full model."""
  model, variables, src_BL, segments_BL = _setup()
  n = len(prefixes)
  # One width for every prefix (one compile): the decoder is causal, so what
  # follows a prefix does not change its logits.
  tgt = np.zeros((n, STEPS + 1), np.int32)
  for i, p in enumerate(prefixes):
    tgt[i, :len(p)] = p
  logits = _full(model)(variables, jnp.repeat(src_BL[row:row + 1], n, 0),
                        jnp.asarray(tgt), jnp.repeat(segments_BL[row:row + 1],
                                                     n, 0))
  lengths = np.asarray([len(p) for p in prefixes]) - 1
  last = np.asarray(logits)[np.arange(n), lengths].astype(np.float64)
  return last - np.log(np.exp(last - last.max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - last.max(-1, keepdims=True)


def _naive_greedy(row, eos, pad=0):
  out, prefix, done = [], [BOS], False
  for _ in range(STEPS):
    if done:
      out.append(pad)
      continue
    token = int(np.argmax(_next_logp([prefix], row)[0]))
    out.append(token)
    prefix.append(token)
    done = token == eos
  return out


def _naive_beam(row, k, eos, alpha, pad=0):
  """The documented beam search, one hypothesis at a time."""
  beams = [([BOS], 0.0 if j == 0 else -np.inf, False, 0) for j in range(k)]
  for _ in range(STEPS):
    if all(done for _, _, done, _ in beams):
      break
    logp = _next_logp([b[0] for b in beams], row)
    candidates = []
    for j, (prefix, score, done, length) in enumerate(beams):
      for v in range(V):
        step = (0.0 if v == pad else -np.inf) if done else logp[j, v]
        candidates.append((score + step, j, v))
    order = sorted(range(len(candidates)), key=lambda i: -candidates[i][0])
    new = []
    for i in order[:k]:
      score, j, v = candidates[i]
      prefix, _, done, length = beams[j]
      new.append((prefix + [v], score, done or v == eos,
                  length + (0 if done else 1)))
    beams = new
  best = max(range(k), key=lambda j: beams[j][1] / (
      (5.0 + beams[j][3]) / 6.0) ** alpha)
  tokens = beams[best][0][1:]
  return tokens + [pad] * (STEPS - len(tokens)), beams[best][1]


def _eos():
  """An EOS id that the greedy search of row 0 emits at its third step, so
  rows finish at different steps."""
  return _naive_greedy(0, eos=-1)[2]


def test_greedy_equals_the_naive_search_and_pads_after_eos():
  model, variables, src_BL, segments_BL = _setup()
  eos = _eos()
  got = greedy_search(model, variables, src_BL, segments_BL, max_steps=STEPS,
                      bos_id=BOS, eos_id=eos)
  want = [_naive_greedy(row, eos) for row in range(3)]
  np.testing.assert_array_equal(got, want)
  assert list(got[0, 3:]) == [0] * (STEPS - 3)  # Padding after EOS.


@pytest.mark.parametrize("k,alpha", [(3, 0.6), (4, 0.0)])
def test_beam_search_equals_the_naive_search(k, alpha):
  model, variables, src_BL, segments_BL = _setup()
  eos = _eos()
  tokens, scores = beam_search(model, variables, src_BL, segments_BL,
                               max_steps=STEPS, beam_size=k, bos_id=BOS,
                               eos_id=eos, alpha=alpha)
  greedy = greedy_search(model, variables, src_BL, segments_BL,
                         max_steps=STEPS, bos_id=BOS, eos_id=eos)
  assert not np.array_equal(tokens, greedy)  # The beams matter here.
  for row in range(3):
    want_tokens, want_score = _naive_beam(row, k, eos, alpha)
    np.testing.assert_array_equal(tokens[row], want_tokens, err_msg=str(row))
    np.testing.assert_allclose(scores[row], want_score, rtol=1e-4)


def test_one_beam_is_greedy():
  model, variables, src_BL, segments_BL = _setup()
  eos = _eos()
  kw = dict(max_steps=STEPS, bos_id=BOS, eos_id=eos)
  tokens, _ = beam_search(model, variables, src_BL, segments_BL, beam_size=1,
                          alpha=0.0, **kw)
  np.testing.assert_array_equal(
      tokens, greedy_search(model, variables, src_BL, segments_BL, **kw))


def test_source_padding_changes_nothing():
  model, variables, src_BL, segments_BL = _setup()
  kw = dict(max_steps=STEPS, bos_id=BOS, eos_id=_eos())
  padded = greedy_search(model, variables, src_BL, segments_BL, **kw)[2]
  alone = greedy_search(model, variables, src_BL[2:, :5], **kw)[0]
  np.testing.assert_array_equal(padded, alone)
  beams, _ = beam_search(model, variables, src_BL, segments_BL, beam_size=3,
                         **kw)
  beams_alone, _ = beam_search(model, variables, src_BL[2:, :5], beam_size=3,
                               **kw)
  np.testing.assert_array_equal(beams[2], beams_alone[0])


def test_bad_settings_are_one_line_errors():
  model, variables, src_BL, _ = _setup()
  with pytest.raises(ConfigError, match="max_steps=9 must be in 1..model"):
    greedy_search(model, variables, src_BL, max_steps=MAX_LEN, bos_id=BOS,
                  eos_id=2)
  with pytest.raises(ConfigError, match="beam_size must be >= 1"):
    beam_search(model, variables, src_BL, max_steps=2, beam_size=0,
                bos_id=BOS, eos_id=2)
  decoder = make_model(TransformerConfig(vocab_size=V, max_len=MAX_LEN,
                                         num_layers=1, d_model=16, num_heads=2,
                                         d_ff=32))
  with pytest.raises(ConfigError, match="search decodes an encoder-decoder"):
    greedy_search(decoder, {}, src_BL, max_steps=2, bos_id=BOS, eos_id=2)


def test_length_penalty_is_wu_et_al():
  np.testing.assert_allclose(length_penalty(jnp.asarray([1, 7]), 0.6),
                             [1.0, 2.0 ** 0.6], rtol=1e-6)
  np.testing.assert_array_equal(length_penalty(jnp.asarray([3, 9]), 0.0), 1.0)
