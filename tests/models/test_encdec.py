"""The encoder (masked LM) and encoder-decoder against a naive reference on
packed rows, no attention across packed examples, cached decoding.

The reference is plain jnp over the models' own params: attention with masks
built position by position (bidirectional within a segment for the encoder,
causal within a segment for the decoder, target segment s to source segment s
for cross-attention, padding attending to nothing), dense FFNs and a dropless
Switch MoE written out per expert.
"""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import layout
from moejax.errors import ConfigError
from moejax.models import (EncoderDecoder, MoEConfig, TransformerConfig,
                           TransformerLM, make_model)
from moejax.models.config import transformer_config_from_json
from moejax.models.decode import decoding_config
from moejax.models.encdec import extend
from moejax.models.sizes import param_counts

V, MAX_LEN, D, H, E = 32, 12, 16, 2, 4
S, L = 10, 8  # Source and target lengths of a packed row.
# Example lengths per row: source and target rows pack the same examples.
SOURCE_LENGTHS = ((3, 4, 2), (6, 3))
TARGET_LENGTHS = ((2, 3, 2), (4, 3))


def _config(arch, **kw):
  base = dict(vocab_size=V, max_len=MAX_LEN, num_layers=2, d_model=D,
              num_heads=H, d_ff=32, arch=arch, moe_layers=(1,),
              moe=MoEConfig(num_experts=E, router="switch", dispatch="dropless"))
  if arch == "encdec":
    base.update(encoder_moe_layers=(0,))
  return TransformerConfig(**{**base, **kw})


def _packed(lengths, total):
  """(segments, positions) int32[B, total]: examples 1, 2, ... then padding 0."""
  segments = np.zeros((len(lengths), total), np.int32)
  positions = np.zeros((len(lengths), total), np.int32)
  for b, row in enumerate(lengths):
    at = 0
    for s, n in enumerate(row, start=1):
      segments[b, at:at + n], positions[b, at:at + n] = s, np.arange(n)
      at += n
  return jnp.asarray(segments), jnp.asarray(positions)


def _tokens(seed, length):
  return jax.random.randint(jax.random.key(seed), (2, length), 0, V)


# The naive reference -------------------------------------------------------


def _mask(q_seg, k_seg, causal):
  """bool[B, Lq, Lk] built one position pair at a time."""
  q_seg, k_seg = np.asarray(q_seg), np.asarray(k_seg)
  out = np.zeros((q_seg.shape[0], q_seg.shape[1], k_seg.shape[1]), bool)
  for b in range(q_seg.shape[0]):
    for i in range(q_seg.shape[1]):
      for j in range(k_seg.shape[1]):
        out[b, i, j] = (q_seg[b, i] != 0 and q_seg[b, i] == k_seg[b, j]
                        and (not causal or j <= i))
  return jnp.asarray(out)


def _rms(x, p):
  return x * jax.lax.rsqrt(jnp.mean(x ** 2, -1, keepdims=True) + 1e-6) * p["scale"]


def _attention(q, k, v, mask):
  """q [B, Lq, H, A], k and v [B, Lk, H, A]; a query with no key gets 0."""
  scores = jnp.einsum("bqha,bkha->bhqk", q, k) / np.sqrt(q.shape[-1])
  scores = jnp.where(mask[:, None], scores, -1e30)
  probs = jax.nn.softmax(scores, axis=-1) * mask.any(-1)[:, None, :, None]
  return jnp.einsum("bhqk,bkha->bqha", probs, v)


def _self_attention(p, x, mask):
  qkv = jnp.einsum("bld,dtha->bltha", x, p["qkv"]["kernel"])
  o = _attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask)
  return jnp.einsum("blha,had->bld", o, p["out"]["kernel"])


def _cross_attention(p, x, memory, mask):
  q = jnp.einsum("bld,dha->blha", x, p["query"]["kernel"])
  kv = jnp.einsum("bsd,dtha->bstha", memory, p["kv"]["kernel"])
  o = _attention(q, kv[:, :, 0], kv[:, :, 1], mask)
  return jnp.einsum("blha,had->bld", o, p["out"]["kernel"])


def _ffn(p, h):
  if "ffn" in p:
    return jax.nn.gelu(h @ p["ffn"]["w_in"]["kernel"]) @ p["ffn"]["w_out"]["kernel"]
  moe = p["moe"]  # Switch, dropless: each token to its top expert, gate p_e.
  probs = jax.nn.softmax(h @ moe["router"]["gate"]["kernel"], axis=-1)
  top = jnp.argmax(probs, axis=-1)
  gate = jnp.take_along_axis(probs, top[..., None], -1) * jax.nn.one_hot(top, E)
  hidden = jax.nn.gelu(jnp.einsum("bld,edf->blef", h, moe["experts"]["w_in"]))
  y = jnp.einsum("blef,efd->bled", hidden, moe["experts"]["w_out"])
  return jnp.einsum("ble,bled->bld", gate, y)


def _stack(p, x, mask, num_layers, memory=None):
  for i in range(num_layers):
    b = p[f"block_{i}"]
    x = x + _self_attention(b["attn"], _rms(x, b["attn_norm"]), mask)
    if memory is not None:
      x = x + _cross_attention(b["cross_attn"], _rms(x, b["cross_norm"]),
                               *memory)
    x = x + _ffn(b, _rms(x, b["ffn_norm"]))
  return x


@jax.jit
def _reference_encoder(params, tokens, pos, mask):
  x = params["embedding"][tokens] + params["position"][pos]
  x = _stack(params, x, mask, 2)
  return _rms(x, params["final_norm"]) @ params["embedding"].T


@jax.jit
def _reference_encdec(params, src, tgt, src_pos, tgt_pos, masks):
  """`masks`: (encoder self, decoder self, cross) from `_mask`."""
  enc, dec = params["encoder"], params["decoder"]
  emb = params["embedding"]
  x = params.get("source_embedding", emb)[src] + enc["position"][src_pos]
  x = _rms(_stack(enc, x, masks[0], 2), enc["final_norm"])
  y = emb[tgt] + dec["position"][tgt_pos]
  y = _stack(dec, y, masks[1], 2, memory=(x, masks[2]))
  return _rms(y, dec["final_norm"]) @ emb.T


# ----------------------------------------------------------------------------


@functools.cache
def _encdec_setup(share_embeddings=True):
  config = _config("encdec", share_embeddings=share_embeddings)
  model = make_model(config)
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), _tokens(1, S),
                                           _tokens(2, L)))
  return config, model, variables


def _encdec_inputs(src, tgt):
  src_seg, src_pos = _packed(SOURCE_LENGTHS, S)
  tgt_seg, tgt_pos = _packed(TARGET_LENGTHS, L)
  return dict(source_BL=src, target_BL=tgt, source_segments_BL=src_seg,
              target_segments_BL=tgt_seg, source_positions_BL=src_pos,
              target_positions_BL=tgt_pos)


@functools.cache
def _jitted_apply(model):
  return jax.jit(lambda v, i: model.apply(v, **i))


def _run_encdec(model, variables, src, tgt):
  return _jitted_apply(model)(variables, _encdec_inputs(src, tgt))


def test_encoder_equals_the_naive_reference_on_packed_rows():
  config = _config("encoder")
  model = make_model(config)
  assert isinstance(model, TransformerLM)
  tokens = _tokens(1, S)
  seg, pos = _packed(SOURCE_LENGTHS, S)
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens))
  logits, aux = jax.jit(functools.partial(model.apply, segments_BL=seg,
                                          positions_BL=pos))(variables, tokens)
  expected = _reference_encoder(variables["params"], tokens, pos,
                                _mask(seg, seg, causal=False))
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
  assert set(aux["layers"]) == {"layer_1"}
  assert aux["routes"]["layer_1"].shape == (2 * S,)


@pytest.mark.parametrize("share", [True, False])
def test_encdec_equals_the_naive_reference_on_packed_rows(share):
  config, model, variables = _encdec_setup(share)
  assert isinstance(model, EncoderDecoder)
  assert ("source_embedding" in variables["params"]) == (not share)
  src, tgt = _tokens(1, S), _tokens(2, L)
  logits, aux = _run_encdec(model, variables, src, tgt)
  inputs = _encdec_inputs(src, tgt)
  src_seg, tgt_seg = inputs["source_segments_BL"], inputs["target_segments_BL"]
  masks = (_mask(src_seg, src_seg, causal=False),
           _mask(tgt_seg, tgt_seg, causal=True),
           _mask(tgt_seg, src_seg, causal=False))
  expected = _reference_encdec(
      variables["params"], src, tgt, inputs["source_positions_BL"],
      inputs["target_positions_BL"], masks)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
  # Both stacks' MoE layers, named by stack, the model's aux loss their sum.
  assert set(aux["layers"]) == {"encoder_layer_0", "decoder_layer_1"}
  assert aux["routes"]["encoder_layer_0"].shape == (2 * S,)
  assert aux["routes"]["decoder_layer_1"].shape == (2 * L,)
  np.testing.assert_allclose(
      aux["aux_loss"], sum(m["aux_loss"] for m in aux["layers"].values()),
      rtol=1e-6)
  for layer in aux["layers"]:  # Replay finds each layer's variables.
    path = layout.moe_path(layer).split("/")
    assert "router" in functools.reduce(dict.get, path, variables["params"])


def _changed(tokens, row, segments, seg_id, seed):
  """`tokens` with new ids in example `seg_id` of `row`."""
  new = _tokens(seed, tokens.shape[1])
  at = (segments == seg_id) & (jnp.arange(tokens.shape[0]) == row)[:, None]
  assert at.any()
  return jnp.where(at, new, tokens)


def test_no_attention_crosses_packed_examples():
  # Dropless Switch routes each token alone: only attention could leak.
  src, tgt = _tokens(1, S), _tokens(2, L)
  src_seg, src_pos = _packed(SOURCE_LENGTHS, S)
  tgt_seg, _ = _packed(TARGET_LENGTHS, L)

  model = make_model(_config("encoder"))
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), src))
  run = jax.jit(lambda t: model.apply(variables, t, segments_BL=src_seg,
                                      positions_BL=src_pos)[0])
  before, after = run(src), run(_changed(src, 0, src_seg, 2, seed=7))
  others = (src_seg != 2) | (jnp.arange(2) == 1)[:, None]
  np.testing.assert_array_equal(np.asarray(before)[np.asarray(others)],
                                np.asarray(after)[np.asarray(others)])
  assert not np.allclose(before, after)  # Example 2 itself did change.

  _, model, variables = _encdec_setup()
  base, _ = _run_encdec(model, variables, src, tgt)
  others = np.asarray((tgt_seg != 2) | (jnp.arange(2) == 1)[:, None])
  for new_src, new_tgt in [(_changed(src, 0, src_seg, 2, seed=8), tgt),
                           (src, _changed(tgt, 0, tgt_seg, 2, seed=9))]:
    logits, _ = _run_encdec(model, variables, new_src, new_tgt)
    np.testing.assert_array_equal(np.asarray(logits)[others],
                                  np.asarray(base)[others])
    assert not np.allclose(logits, base)


def test_padding_is_ignored():
  """Padding tokens' ids change no real token's output."""
  src, tgt = _tokens(1, S), _tokens(2, L)
  src_seg, _ = _packed(SOURCE_LENGTHS, S)
  tgt_seg, _ = _packed(TARGET_LENGTHS, L)
  _, model, variables = _encdec_setup()
  base, _ = _run_encdec(model, variables, src, tgt)
  logits, _ = _run_encdec(model, variables, _changed(src, 0, src_seg, 0, 3),
                          _changed(tgt, 0, tgt_seg, 0, 4))
  real = np.asarray(tgt_seg != 0)
  np.testing.assert_array_equal(np.asarray(logits)[real], np.asarray(base)[real])


def test_cached_decoding_equals_the_full_decoder():
  """Prefill then one token at a time, eagerly and as one jitted scan: the
  same logits as the uncached call, with a padded source."""
  config = decoding_config(_config("encdec"))
  model = make_model(config)
  variables = _encdec_setup()[2]
  src, tgt = _tokens(1, S), _tokens(2, L)
  src_seg = jnp.asarray([[1] * S, [1] * 7 + [0] * 3], jnp.int32)  # Row 1 padded.
  full, aux = jax.jit(functools.partial(model.apply, source_segments_BL=src_seg)
                      )(variables, src, tgt)
  encoded, _ = jax.jit(functools.partial(
      model.apply, method=EncoderDecoder.encode, source_segments_BL=src_seg))(
          variables, src)
  decoder = model.clone(decode=True)
  prefill = 3
  cache, logits, _ = jax.jit(functools.partial(extend, decoder))(
      variables, None, tgt[:, :prefill], encoded, src_seg)
  step = jax.jit(lambda c, t: extend(decoder, variables, c, t))
  steps = [logits]
  for t in range(prefill, L):
    cache, logits, _ = step(cache, tgt[:, t:t + 1])
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, 1), full, rtol=1e-5,
                             atol=1e-5)
  # The source is encoded once: its keys and values sit in the cache.
  cross = cache["decoder"]["block_0"]["cross_attn"]
  assert cross["key"].shape == (2, S, H, D // H)

  @jax.jit
  def scanned(variables, encoded, tgt):
    cache, logits, _ = extend(decoder, variables, None, tgt[:, :1], encoded,
                              src_seg)
    def one(cache, token_B):
      cache, logits, _ = extend(decoder, variables, cache, token_B[:, None])
      return cache, logits[:, 0]
    _, rest = jax.lax.scan(one, cache, tgt[:, 1:].T)
    return jnp.concatenate([logits, rest.transpose(1, 0, 2)], axis=1)
  np.testing.assert_allclose(scanned(variables, encoded, tgt), full,
                             rtol=1e-5, atol=1e-5)
  assert set(aux["routes"]) == {"encoder_layer_0", "decoder_layer_1"}


def test_bad_settings_are_one_line_errors():
  src, tgt = _tokens(1, S), _tokens(2, L)
  with pytest.raises(ConfigError, match="model.arch='seq2seq'"):
    make_model(_config("seq2seq"))
  with pytest.raises(ConfigError, match="scan_layers is not supported"):
    EncoderDecoder(_config("encdec", scan_layers=True)).init(
        jax.random.key(0), src, tgt)
  with pytest.raises(ConfigError, match="is moejax.models.EncoderDecoder"):
    TransformerLM(_config("encdec")).init(jax.random.key(0), src)
  with pytest.raises(ConfigError, match="no cached decoding"):
    TransformerLM(_config("encoder"), decode=True).init(jax.random.key(0), src)


def test_layer_names_and_paths_say_which_stack():
  assert layout.layer_name(3, "encoder") == "encoder_layer_3"
  assert layout.moe_path("encoder_layer_3") == "encoder/block_3/moe"
  assert layout.moe_path("decoder_layer_0") == "decoder/block_0/moe"
  assert layout.moe_path("layer_2") == "block_2/moe"
  with pytest.raises(ConfigError, match="not a MoE layer's name"):
    layout.moe_path("middle_layer_1")


def test_encoder_depth_and_placement_per_stack():
  config = _config("encdec", num_encoder_layers=3, encoder_moe_layers=(2,),
                   moe_layers=(0, 1))
  params = jax.eval_shape(make_model(config).init, jax.random.key(0),
                          _tokens(1, S), _tokens(2, L))["params"]
  assert sorted(params["encoder"]) == ["block_0", "block_1", "block_2",
                                       "final_norm", "position"]
  assert "moe" in params["encoder"]["block_2"]
  assert "ffn" in params["encoder"]["block_0"]
  assert all("moe" in params["decoder"][f"block_{i}"] for i in (0, 1))
  assert dataclasses.replace(config, num_encoder_layers=None).encoder_depth == 2


def test_config_json_round_trips_and_old_files_read_as_decoders():
  config = _config("encdec", num_encoder_layers=3, encoder_moe_layers=(1, 2),
                   share_embeddings=False)
  saved = json.loads(json.dumps(dataclasses.asdict(config)))
  assert transformer_config_from_json(saved) == config
  old = {k: v for k, v in dataclasses.asdict(_config("decoder")).items()
         if k not in ("arch", "num_encoder_layers", "encoder_moe_layers",
                      "share_embeddings")}
  assert transformer_config_from_json(old) == _config("decoder")


def test_param_counts_cover_both_stacks():
  config = _config("encdec")
  params = jax.eval_shape(make_model(config).init, jax.random.key(0),
                          _tokens(1, S), _tokens(2, L))["params"]
  sizes = {k: sum(np.prod(x.shape) for x in jax.tree.leaves(v))
           for k, v in params.items()}
  total, active = param_counts(config)
  assert total == sum(sizes.values())
  expert = D * 32 * 2  # One expert's w_in and w_out; a token uses 1 of E = 4.
  assert active == total - 2 * (E - 1) * expert  # Two MoE layers.


def test_remat_is_the_same_function():
  _, model, variables = _encdec_setup()
  inputs = _encdec_inputs(_tokens(1, S), _tokens(2, L))

  def grads(model):
    def loss(params):
      logits, aux = model.apply({"params": params}, **inputs)
      return jnp.mean(logits ** 2) + aux["aux_loss"]
    return jax.jit(jax.value_and_grad(loss))(variables["params"])
  rematted = make_model(_config("encdec", remat="full"))
  for a, b in zip(jax.tree.leaves(grads(model)), jax.tree.leaves(grads(rematted)),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_a_packed_example_of_the_decoder_lm_equals_it_alone():
  """`arch=decoder` with segments and positions: example 2 of a packed row
  gives the logits it gives as a row of its own."""
  model = make_model(_config("decoder"))
  tokens = _tokens(1, S)
  seg, pos = _packed(SOURCE_LENGTHS, S)
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens))
  packed, _ = jax.jit(functools.partial(model.apply, segments_BL=seg,
                                        positions_BL=pos))(variables, tokens)
  start, n = SOURCE_LENGTHS[0][0], SOURCE_LENGTHS[0][1]  # Row 0, example 2.
  alone, _ = jax.jit(model.apply)(variables, tokens[:1, start:start + n])
  np.testing.assert_allclose(packed[0, start:start + n], alone[0], rtol=1e-5,
                             atol=1e-6)
