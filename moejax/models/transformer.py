"""A decoder-only Transformer LM (or, `model.arch=encoder`, a bidirectional
masked LM) whose chosen FFN layers are MoE layers, and the blocks that
`moejax.models.encdec` builds its encoder-decoder from.

Shapes: B batch, L length (of this call when decoding), T tokens (B * L), D
model width, F hidden width, E experts, K top-k slots, A head width, H heads,
V vocabulary, X cache positions (max_len).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax.layout import (LAYERS_AXIS, block_name, layer_name, scanned,
                           stack_name, stacks)
from moejax.models.attention import (KERNEL_INIT, CrossAttention, attend,
                                     kernel_init, self_mask)
from moejax.models.config import (ARCHS, DTYPES, REMAT_POLICIES,
                                  TransformerConfig)
from moejax.moe.ffn_init import FFNInit
from moejax.moe.layer import MoELayer

class CausalSelfAttention(nn.Module):
  """Multi-head self-attention, causal unless `causal=False` (an encoder's)."""

  num_heads: int
  dtype: jnp.dtype = jnp.float32
  causal: bool = True

  @nn.compact
  def __call__(self, x_BLD: jax.Array, cache_at: jax.Array | None = None,
               cache_len: int = 0, mask_B1LL: jax.Array | None = None
               ) -> jax.Array:
    """[B, L, D] -> [B, L, D]. `mask_B1LL` (`moejax.models.attention`: packed
    rows) replaces the causal mask. With `cache_at` (decoding, causal only),
    the L tokens sit at positions cache_at.. and attend to a `cache` of
    cache_len keys and values."""
    d_model = x_BLD.shape[-1]
    head_dim = d_model // self.num_heads
    qkv = nn.DenseGeneral(
        (3, self.num_heads, head_dim), use_bias=False, dtype=self.dtype,
        kernel_init=kernel_init(("embed", None, "heads", "kv")), name="qkv")(x_BLD)
    q_BLHA, k_BLHA, v_BLHA = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if cache_at is not None and not self.causal:
      raise ConfigError("a bidirectional encoder cannot decode token by token; "
                        "run it on the whole sequence")
    if mask_B1LL is not None and cache_at is None:
      o_BLHA = attend(q_BLHA, k_BLHA, v_BLHA, mask_B1LL)
    elif cache_at is None:
      o_BLHA = jax.nn.dot_product_attention(q_BLHA, k_BLHA, v_BLHA,
                                            is_causal=self.causal)
    else:
      o_BLHA = self._cached(q_BLHA, k_BLHA, v_BLHA, cache_at, cache_len)
    return nn.DenseGeneral(
        d_model, axis=(-2, -1), use_bias=False, dtype=self.dtype,
        kernel_init=kernel_init(("heads", "kv", "embed")), name="out")(o_BLHA)

  def _cached(self, q_BLHA, k_BLHA, v_BLHA, start, cache_len):
    """Writes this call's keys and values at `start` and attends causally to
    everything cached so far (X = cache_len positions, later ones masked)."""
    batch, length, heads, head_dim = k_BLHA.shape
    shape = (batch, cache_len, heads, head_dim)
    key = self.variable("cache", "key", jnp.zeros, shape, k_BLHA.dtype)
    value = self.variable("cache", "value", jnp.zeros, shape, v_BLHA.dtype)
    at = (0, start, 0, 0)
    key.value = jax.lax.dynamic_update_slice(key.value, k_BLHA, at)
    value.value = jax.lax.dynamic_update_slice(value.value, v_BLHA, at)
    query_pos_L = start + jnp.arange(length)
    mask_LX = jnp.arange(cache_len)[None, :] <= query_pos_L[:, None]
    return jax.nn.dot_product_attention(q_BLHA, key.value, value.value,
                                        mask=mask_LX[None, None])


class DenseFFN(nn.Module):
  """GELU FFN D -> F -> D, initialized as every expert is (`ffn_init`)."""

  d_ff: int
  dtype: jnp.dtype = jnp.float32
  ffn_init: FFNInit = FFNInit()

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    init = self.ffn_init
    h_BLF = nn.Dense(self.d_ff, use_bias=False, dtype=self.dtype,
                     kernel_init=nn.with_logical_partitioning(
                         init.w_in, ("embed", "mlp")), name="w_in")(x_BLD)
    return nn.Dense(x_BLD.shape[-1], use_bias=False, dtype=self.dtype,
                    kernel_init=nn.with_logical_partitioning(
                        init.w_out, ("mlp", "embed")), name="w_out")(
                            nn.gelu(h_BLF))


def norm(name: str, dtype) -> nn.RMSNorm:
  return nn.RMSNorm(dtype=dtype, name=name, scale_init=nn.with_logical_partitioning(
      nn.initializers.ones, ("norm",)))


class Block(nn.Module):
  """Pre-norm block: x + attn(norm(x)); [x + cross_attn(norm(x), memory);]
  x + ffn(norm(x)), ffn dense or MoE. Self-attention is causal unless
  `causal=False`; `cross` adds attention to an encoder's output (`memory`:
  (output [B, L, D], mask [B, 1, L, L])).

  Returns (x [B, L, D], the MoE layer's `MoEAux` or None for a dense FFN)."""

  config: TransformerConfig
  is_moe: bool
  deterministic: bool = True
  mesh: jax.sharding.Mesh | None = None
  causal: bool = True
  cross: bool = False

  @nn.compact
  def __call__(self, x_BLD, token_ids_BL, step=None, cache_at=None,
               mask_B1LL=None, memory=None):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    x_BLD = x_BLD + CausalSelfAttention(
        cfg.num_heads, dtype, self.causal, name="attn")(
            norm("attn_norm", dtype)(x_BLD), cache_at, cfg.max_len, mask_B1LL)
    if self.cross:
      memory_BLD, cross_mask_B1LL = memory
      x_BLD = x_BLD + CrossAttention(cfg.num_heads, dtype, name="cross_attn")(
          norm("cross_norm", dtype)(x_BLD), memory_BLD, cross_mask_B1LL,
          cached=cache_at is not None)
    h_BLD = norm("ffn_norm", dtype)(x_BLD)
    ffn_init = FFNInit(cfg.ffn_init, cfg.num_layers)
    if not self.is_moe:
      return x_BLD + DenseFFN(cfg.d_ff, dtype, ffn_init, name="ffn")(h_BLD), None
    moe = cfg.moe
    y_BLD, aux = MoELayer(
        router=moe.router, num_experts=moe.num_experts, d_ff=moe.d_ff or cfg.d_ff,
        dispatch=moe.dispatch, capacity_factor=moe.capacity_factor, dtype=dtype,
        matmul=moe.matmul, mesh=self.mesh, top_k=moe.top_k,
        router_options=dict(moe.router_options), vocab_size=cfg.vocab_size,
        num_shared_experts=moe.num_shared_experts, ffn_init=ffn_init,
        expert_depth=moe.expert_depth, name="moe")(
            h_BLD, token_ids_BL=token_ids_BL, step=step,
            deterministic=self.deterministic, residual_BLD=x_BLD)
    return x_BLD + y_BLD, aux


class BlockUnit(nn.Module):
  """Consecutive blocks, the unit that `model.scan_layers` repeats: blocks
  `block_<k>` of the unit, `unit[k]` saying whether block k is MoE. Returns
  (x [B, L, D], the MoE blocks' `MoEAux`es in unit order)."""

  config: TransformerConfig
  unit: tuple[bool, ...]
  deterministic: bool = True
  mesh: jax.sharding.Mesh | None = None

  causal: bool = True

  @nn.compact
  def __call__(self, x_BLD, token_ids_BL, step=None, cache_at=None,
               mask_B1LL=None):
    auxes = []
    for k, is_moe in enumerate(self.unit):
      x_BLD, aux = Block(self.config, is_moe, self.deterministic, self.mesh,
                         self.causal, name=block_name(k))(
                             x_BLD, token_ids_BL, step, cache_at, mask_B1LL)
      if aux is not None:
        auxes.append(aux)
    return x_BLD, tuple(auxes)


def remat_policy(name: str):
  """The `jax.checkpoint` policy of `model.remat=name` (see `REMAT_POLICIES`)."""
  policies = jax.checkpoint_policies
  return {"full": None, "dots": policies.checkpoint_dots,
          "dots_no_batch": policies.dots_with_no_batch_dims_saveable}[name]


def _rematted(module_cls, name: str, *, in_scan: bool):
  """`module_cls` recomputed in the backward pass under policy `name`."""
  if name == "none":
    return module_cls
  # Inside a scan the loop already keeps XLA from merging the recomputation
  # into the forward pass (flax's advice: prevent_cse=False there).
  return nn.remat(module_cls, policy=remat_policy(name),
                  prevent_cse=not in_scan)


def scanned_unit(config: TransformerConfig, repeats: int):
  """`BlockUnit` as `nn.scan` over R copies: every variable collection
  (params, router state, cache, replay) gets a leading axis of R, named
  `layers` for sharding; rngs differ per copy; the carry is x."""
  return nn.scan(
      _rematted(BlockUnit, config.remat, in_scan=True),
      variable_axes={True: 0}, split_rngs={True: True},
      in_axes=(nn.broadcast,) * 4, length=repeats,
      metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})


class TransformerLM(nn.Module):
  """Token ids [B, L] -> float32 logits [B, L, V] and per-MoE-layer aux outputs.

  `model.arch=decoder`: causal (next-token) attention; `encoder`: bidirectional
  (the logits at every position are a masked LM's). Packed rows pass
  `segments_BL` int[B, L] (examples numbered from 1, padding 0: no attention
  crosses examples, `moejax.models.attention`) and `positions_BL` (each
  example's positions from 0); without them a row is one example.

  `__call__` returns `(logits_BLV, aux)` where `aux = {"aux_loss": float32[] sum
  over MoE layers, "layers": {"layer_<i>": metrics dict}, "routes": {"layer_<i>":
  int32[B*L] top expert per token}, "loads": {"layer_<i>": float32[E]},
  "trace": {"layer_<i>": {"expert", "weight", "mask": [B*L, K]}}}` (the
  routing trace, `moejax.routing.replay`); with `hidden=True` it returns
  `(x_BLD, aux)` instead: the final-norm hidden states [B, L, D] that the tied
  head reads (what `moejax.models.classifier` pools). Training passes
  `deterministic=False`, an rng stream named `router`, and `step` (steps into
  the current stage) for routers with schedules, and applies the model with the
  `router_state` collection mutable (`moejax.routing.ROUTER_STATE`).

  With a `mesh` (`moejax.parallel.make_mesh`) the MoE layers run expert-parallel:
  dispatch, experts and combine inside `shard_map`, tokens moved by all-to-all.

  With `decode=True` each call continues the sequence held in the mutable
  `cache` collection (keys and values of every block for max_len positions,
  and the next position): apply with `mutable=["cache"]`, without a `cache`
  the first time. `moejax.models.decode` generates text with it.
  """

  config: TransformerConfig
  mesh: jax.sharding.Mesh | None = None
  decode: bool = False

  @nn.compact
  def __call__(self, tokens_BL: jax.Array, *, deterministic: bool = True,
               step: jax.Array | None = None,
               segments_BL: jax.Array | None = None,
               positions_BL: jax.Array | None = None, hidden: bool = False):
    cfg = self.config
    check_config(cfg)
    if cfg.arch == "encdec":
      raise ConfigError("model.arch='encdec' is moejax.models.EncoderDecoder "
                        "(make_model builds the right one), not TransformerLM")
    causal = cfg.arch == "decoder"
    if self.decode and not causal:
      raise ConfigError(f"model.arch={cfg.arch!r} is bidirectional: it has no "
                        "cached decoding")
    dtype = jnp.dtype(cfg.dtype)
    embed = self.param(
        "embedding",
        nn.with_logical_partitioning(KERNEL_INIT, ("vocab", "embed")),
        (cfg.vocab_size, cfg.d_model), jnp.float32)
    pos = self.param(
        "position",
        nn.with_logical_partitioning(KERNEL_INIT, (None, "embed")),
        (cfg.max_len, cfg.d_model), jnp.float32)
    pos_LD, cache_at = embed_positions(self, pos, tokens_BL.shape[1],
                                       positions_BL, self.decode)
    x_BLD = (embed[tokens_BL] + pos_LD).astype(dtype)
    mask_B1LL = None if segments_BL is None else self_mask(segments_BL, causal)
    if cfg.scan_layers:
      x_BLD, auxes = self._scanned(x_BLD, tokens_BL, deterministic, step,
                                   cache_at, mask_B1LL, causal)
    else:
      x_BLD, auxes = unrolled_blocks(
          cfg, cfg.num_layers, cfg.moe_layers, x_BLD, tokens_BL,
          deterministic=deterministic, mesh=self.mesh, step=step,
          cache_at=cache_at, mask_B1LL=mask_B1LL, causal=causal)
    x_BLD = norm("final_norm", dtype)(x_BLD)
    if hidden:
      return x_BLD, collect_aux(auxes)
    logits_BLV = jnp.einsum("bld,vd->blv", x_BLD.astype(jnp.float32), embed)
    return logits_BLV, collect_aux(auxes)

  def _scanned(self, x_BLD, tokens_BL, deterministic, step, cache_at,
               mask_B1LL, causal):
    """Each stack of `moejax.layout.stacks` as one scanned unit `stack_<j>`:
    (x, {block index: MoEAux}), copy r of the unit's MoE blocks sliced out."""
    cfg, auxes = self.config, {}
    for j, st in enumerate(stacks(cfg.num_layers, cfg.moe_layers)):
      x_BLD, stacked = scanned_unit(cfg, st.repeats)(
          cfg, st.unit, deterministic, self.mesh, causal, name=stack_name(j))(
              x_BLD, tokens_BL, step, cache_at, mask_B1LL)
      for per_copy, k in zip(stacked, st.moe_positions):
        for r in range(st.repeats):
          auxes[st.block(r, k)] = jax.tree.map(lambda a, r=r: a[r], per_copy)
    return x_BLD, auxes


def check_config(cfg: TransformerConfig) -> None:
  """A ConfigError for a setting no model can run."""
  if cfg.arch not in ARCHS:
    raise ConfigError(f"model.arch={cfg.arch!r}; valid: {', '.join(ARCHS)}")
  if cfg.dtype not in DTYPES:
    raise ConfigError(f"model.dtype={cfg.dtype!r}; valid: {', '.join(DTYPES)}")
  if cfg.remat not in REMAT_POLICIES:
    raise ConfigError(f"model.remat={cfg.remat!r}; valid: "
                      f"{', '.join(REMAT_POLICIES)}")
  if cfg.d_model % cfg.num_heads:
    raise ConfigError(
        f"model.d_model={cfg.d_model} is not divisible by model.num_heads="
        f"{cfg.num_heads}")


def embed_positions(module: nn.Module, pos_XD: jax.Array, length: int,
                    positions_BL: jax.Array | None, decode: bool):
  """(position embeddings [L, D] or [B, L, D], cache_at): the first L rows of
  the table, rows `positions_BL` (packed rows restart each example at 0), or,
  decoding, the L rows after the `cache` position of `module` (which moves on
  by L; cache_at is where it stood, None when not decoding)."""
  if decode:
    next_pos = module.variable("cache", "position", jnp.zeros, (), jnp.int32)
    cache_at = next_pos.value
    next_pos.value = cache_at + length
    return jax.lax.dynamic_slice_in_dim(pos_XD, cache_at, length), cache_at
  if positions_BL is None:
    return pos_XD[:length], None
  return pos_XD[positions_BL], None


def unrolled_blocks(cfg: TransformerConfig, num_layers: int,
                    moe_layers: tuple[int, ...], x_BLD, tokens_BL, *,
                    deterministic, mesh, step=None, cache_at=None,
                    mask_B1LL=None, causal=True, memory=None):
  """Blocks `block_<i>` of the calling module, one after another:
  (x, {block index: MoEAux}). `memory` (encoder output, mask) adds
  cross-attention to every block."""
  auxes = {}
  block = _rematted(Block, cfg.remat, in_scan=False)
  for i in range(num_layers):
    x_BLD, aux = block(cfg, i in moe_layers, deterministic, mesh, causal,
                       memory is not None, name=block_name(i))(
                           x_BLD, tokens_BL, step, cache_at, mask_B1LL, memory)
    if aux is not None:
      auxes[i] = aux
  return x_BLD, auxes


def collect_aux(auxes: dict, name=layer_name) -> dict:
  """The model's aux dict (see `TransformerLM`) from {block index: MoEAux},
  layers named `name(i)`."""
  aux_loss = jnp.zeros((), jnp.float32)
  layers, routes, loads, trace = {}, {}, {}, {}
  for i, aux in sorted(auxes.items()):
    aux_loss = aux_loss + aux.aux_loss
    layers[name(i)] = aux.metrics
    routes[name(i)] = aux.top_expert_T
    loads[name(i)] = aux.load_E
    trace[name(i)] = aux.trace
  return {"aux_loss": aux_loss, "layers": layers, "routes": routes,
          "loads": loads, "trace": trace}


def init_variables(model: nn.Module, rng: jax.Array, *inputs: jax.Array
                   ) -> dict:
  """`model`'s variables at init on `inputs` (token ids; an encoder-decoder's
  source and target), logical-axis boxes removed. A scanned model gets the
  unrolled model's draws laid out scanned (`moejax.layout.scanned`), so both
  layouts of a config start from the same params."""
  if not model.config.scan_layers:
    return dict(nn.unbox(model.init(rng, *inputs)))
  unrolled_model = model.clone(config=dataclasses.replace(
      model.config, scan_layers=False))
  return dict(scanned(nn.unbox(unrolled_model.init(rng, *inputs)),
                      model.config))
