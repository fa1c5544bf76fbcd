"""An encoder-decoder Transformer (`model.arch=encdec`) built from the decoder
LM's blocks and MoE layers.

Shapes: B batch, L length (of the source or of the target, which may differ;
the target's of this call when decoding), D model width, V vocabulary.

The encoder is a stack of bidirectional blocks, the decoder a stack of causal
blocks that also attend to the encoder's output (`Block(cross=True)`). Each
stack has its own learned positions, final norm and MoE placement
(`encoder_moe_layers`, `moe_layers`); token embeddings are shared by source,
target and the output projection (`share_embeddings`) or the source has its
own. Params: `embedding` [V, D], `source_embedding` [V, D] (unshared only),
`encoder/position`, `encoder/block_<i>/...`, `encoder/final_norm`, and the
same under `decoder/` (whose blocks add `cross_norm` and `cross_attn`).
Outputs name MoE layers `encoder_layer_<i>` and `decoder_layer_<i>`
(`moejax.layout.layer_name`).

Packed rows: `source_segments_BL` and `target_segments_BL` number the examples
of a row from 1 (0: padding), `*_positions` restart at 0 for each example;
target segment s attends only to source segment s. An unpacked padded batch
passes segments 1 for tokens and 0 for padding.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax.layout import layer_name
from moejax.models.attention import KERNEL_INIT, segment_mask, self_mask
from moejax.models.config import TransformerConfig
from moejax.models.transformer import (TransformerLM, check_config,
                                       collect_aux, embed_positions, norm,
                                       unrolled_blocks)

ENCODER, DECODER = "encoder", "decoder"


def _table(module: nn.Module, name: str, rows: int, axes, d_model: int):
  return module.param(name, nn.with_logical_partitioning(KERNEL_INIT, axes),
                      (rows, d_model), jnp.float32)


class BlockStack(nn.Module):
  """Learned positions, `num_layers` blocks and a final norm: one side of the
  encoder-decoder. Returns (x [.., D] normed, {block index: MoEAux}).

  The decoder side (`cross`) attends to `memory_BLD`; decoding (`decode`), it
  keeps the source segments in its `cache` with every block's keys and values
  (the encoder's once, the target's growing), so later calls pass no memory.
  """

  config: TransformerConfig
  num_layers: int
  moe_layers: tuple[int, ...]
  causal: bool
  cross: bool = False
  decode: bool = False
  mesh: jax.sharding.Mesh | None = None

  @nn.compact
  def __call__(self, tok_BLD, tokens_BL, *, segments_BL=None,
               positions_BL=None, memory_BLD=None, source_segments_BL=None,
               deterministic=True, step=None):
    cfg = self.config
    pos = _table(self, "position", cfg.max_len, (None, "embed"), cfg.d_model)
    pos_LD, cache_at = embed_positions(self, pos, tokens_BL.shape[1],
                                       positions_BL, self.decode)
    x_BLD = (tok_BLD + pos_LD).astype(jnp.dtype(cfg.dtype))
    mask_B1LL = (None if segments_BL is None or self.decode
                 else self_mask(segments_BL, self.causal))
    memory = None
    if self.cross:
      memory = (memory_BLD, self._cross_mask(tokens_BL, segments_BL, memory_BLD,
                                             source_segments_BL))
    x_BLD, auxes = unrolled_blocks(
        cfg, self.num_layers, self.moe_layers, x_BLD, tokens_BL,
        deterministic=deterministic, mesh=self.mesh, step=step,
        cache_at=cache_at, mask_B1LL=mask_B1LL, causal=self.causal,
        memory=memory)
    return norm("final_norm", jnp.dtype(cfg.dtype))(x_BLD), auxes

  def _cross_mask(self, tokens_BL, segments_BL, memory_BLD, source_segments_BL):
    """bool[B, 1, L, L] (decoding [B, 1, 1, L]: one example per row)."""
    def source():
      if source_segments_BL is not None:
        return jnp.asarray(source_segments_BL, jnp.int32)
      if memory_BLD is None:
        raise ConfigError("the first decoder call needs the encoder's output")
      return jnp.ones(memory_BLD.shape[:2], jnp.int32)
    if self.decode:
      cached = self.variable("cache", "source_segments", source)
      return (cached.value != 0)[:, None, None, :]
    if segments_BL is None:
      segments_BL = jnp.ones(tokens_BL.shape, jnp.int32)
    return segment_mask(segments_BL, source())


def _merged(*auxes: dict) -> dict:
  """One aux dict from the stacks' (their layer names are distinct)."""
  out = {"aux_loss": sum(a["aux_loss"] for a in auxes)}
  for key in ("layers", "routes", "loads", "trace"):
    out[key] = {k: v for a in auxes for k, v in a[key].items()}
  return out


class EncoderDecoder(nn.Module):
  """Source ids [B, L] and target ids [B, L] -> float32 logits [B, L, V] (of
  the target's next tokens) and the MoE layers' aux outputs of both stacks, as
  `TransformerLM` reports them (`aux_loss` summed over both).

  `encode` and `decode_target` run the two halves; with `decode=True`,
  `decode_target` continues the target held in the mutable `cache` (see
  `extend`). Training passes `deterministic=False`, a `router` rng and `step`
  as for `TransformerLM`; the encoder's routers read source ids, the
  decoder's target ids.
  """

  config: TransformerConfig
  mesh: jax.sharding.Mesh | None = None
  decode: bool = False

  def setup(self):
    cfg = self.config
    check_config(cfg)
    if cfg.arch != "encdec":
      raise ConfigError(f"EncoderDecoder needs model.arch='encdec', got "
                        f"{cfg.arch!r}")
    if cfg.scan_layers:
      raise ConfigError("model.scan_layers is not supported with "
                        "model.arch='encdec'; set it False")
    self.embedding = _table(self, "embedding", cfg.vocab_size,
                            ("vocab", "embed"), cfg.d_model)
    self.source_embedding = (
        self.embedding if cfg.share_embeddings else
        _table(self, "source_embedding", cfg.vocab_size, ("vocab", "embed"),
               cfg.d_model))
    self.encoder = BlockStack(cfg, cfg.encoder_depth, cfg.encoder_moe_layers,
                              causal=False, mesh=self.mesh)
    self.decoder = BlockStack(cfg, cfg.num_layers, cfg.moe_layers, causal=True,
                              cross=True, decode=self.decode, mesh=self.mesh)

  def encode(self, source_BL, *, source_segments_BL=None,
             source_positions_BL=None, deterministic=True, step=None):
    """(encoder output [B, L, D], aux of the encoder's MoE layers); the same
    with `decode` True or False (the encoder keeps no cache)."""
    encoded_BLD, auxes = self.encoder(
        self.source_embedding[source_BL], source_BL,
        segments_BL=source_segments_BL, positions_BL=source_positions_BL,
        deterministic=deterministic, step=step)
    return encoded_BLD, collect_aux(
        auxes, functools.partial(layer_name, stack=ENCODER))

  def decode_target(self, target_BL, encoded_BLD=None, *,
                    source_segments_BL=None, target_segments_BL=None,
                    target_positions_BL=None, deterministic=True, step=None):
    """(logits [B, L, V], aux of the decoder's MoE layers) of target tokens
    attending to `encoded_BLD` (decoding: needed on the first call only)."""
    y_BLD, auxes = self.decoder(
        self.embedding[target_BL], target_BL, segments_BL=target_segments_BL,
        positions_BL=target_positions_BL, memory_BLD=encoded_BLD,
        source_segments_BL=source_segments_BL, deterministic=deterministic,
        step=step)
    logits_BLV = jnp.einsum("bld,vd->blv", y_BLD.astype(jnp.float32),
                            self.embedding)
    return logits_BLV, collect_aux(
        auxes, functools.partial(layer_name, stack=DECODER))

  def __call__(self, source_BL, target_BL, *, source_segments_BL=None,
               target_segments_BL=None, source_positions_BL=None,
               target_positions_BL=None, deterministic=True, step=None):
    encoded_BLD, enc_aux = self.encode(
        source_BL, source_segments_BL=source_segments_BL,
        source_positions_BL=source_positions_BL, deterministic=deterministic,
        step=step)
    logits_BLV, dec_aux = self.decode_target(
        target_BL, encoded_BLD, source_segments_BL=source_segments_BL,
        target_segments_BL=target_segments_BL,
        target_positions_BL=target_positions_BL, deterministic=deterministic,
        step=step)
    return logits_BLV, _merged(enc_aux, dec_aux)


def make_model(config: TransformerConfig, *,
               mesh: jax.sharding.Mesh | None = None, decode: bool = False):
  """The model of `config.arch`: `TransformerLM` (decoder, encoder) or
  `EncoderDecoder` (encdec)."""
  check_config(config)
  cls = EncoderDecoder if config.arch == "encdec" else TransformerLM
  return cls(config, mesh=mesh, decode=decode)


def extend(model: EncoderDecoder, variables: dict, cache: dict | None,
           target_BL: jax.Array, encoded_BLD: jax.Array | None = None,
           source_segments_BL: jax.Array | None = None):
  """Appends L target tokens to a cached decode (`model.decode` True):
  (new cache, logits [B, L, V], aux). The first call (`cache=None`) passes the
  encoder's output (and source segments), which the cache then keeps; later
  calls pass neither. Jittable: a search loop carries the cache."""
  inputs = {k: v for k, v in variables.items() if k != "cache"}
  if cache is not None:
    inputs["cache"] = cache
  (logits_BLV, aux), updated = model.apply(
      inputs, target_BL, encoded_BLD, source_segments_BL=source_segments_BL,
      method=EncoderDecoder.decode_target, mutable=["cache"])
  return updated["cache"], logits_BLV, aux
