"""A decoder-only Transformer LM whose chosen FFN layers are MoE layers.

Shapes: B batch, L length (of this call when decoding), T tokens (B * L), D
model width, F hidden width, E experts, K top-k slots, A head width, H heads,
V vocabulary, X cache positions (max_len).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax.layout import block_name, layer_name
from moejax.models.config import DTYPES, TransformerConfig
from moejax.moe.ffn_init import FFNInit
from moejax.moe.layer import MoELayer

_KERNEL_INIT = nn.initializers.normal(0.02)


def _kernel(axes):
  return nn.with_logical_partitioning(_KERNEL_INIT, axes)


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention."""

  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD: jax.Array, cache_at: jax.Array | None = None,
               cache_len: int = 0) -> jax.Array:
    """[B, L, D] -> [B, L, D]. With `cache_at` (decoding), the L tokens sit at
    positions cache_at.. and attend to a `cache` of cache_len keys and values."""
    d_model = x_BLD.shape[-1]
    head_dim = d_model // self.num_heads
    qkv = nn.DenseGeneral(
        (3, self.num_heads, head_dim), use_bias=False, dtype=self.dtype,
        kernel_init=_kernel(("embed", None, "heads", "kv")), name="qkv")(x_BLD)
    q_BLHA, k_BLHA, v_BLHA = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if cache_at is None:
      o_BLHA = jax.nn.dot_product_attention(q_BLHA, k_BLHA, v_BLHA,
                                            is_causal=True)
    else:
      o_BLHA = self._cached(q_BLHA, k_BLHA, v_BLHA, cache_at, cache_len)
    return nn.DenseGeneral(
        d_model, axis=(-2, -1), use_bias=False, dtype=self.dtype,
        kernel_init=_kernel(("heads", "kv", "embed")), name="out")(o_BLHA)

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


def _norm(name: str, dtype) -> nn.RMSNorm:
  return nn.RMSNorm(dtype=dtype, name=name, scale_init=nn.with_logical_partitioning(
      nn.initializers.ones, ("embed",)))


class Block(nn.Module):
  """Pre-norm block: x + attn(norm(x)); x + ffn(norm(x)), ffn dense or MoE."""

  config: TransformerConfig
  is_moe: bool
  mesh: jax.sharding.Mesh | None = None

  @nn.compact
  def __call__(self, x_BLD, token_ids_BL, deterministic: bool, step=None,
               cache_at=None):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    x_BLD = x_BLD + CausalSelfAttention(cfg.num_heads, dtype, name="attn")(
        _norm("attn_norm", dtype)(x_BLD), cache_at, cfg.max_len)
    h_BLD = _norm("ffn_norm", dtype)(x_BLD)
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
            deterministic=deterministic, residual_BLD=x_BLD)
    return x_BLD + y_BLD, aux


class TransformerLM(nn.Module):
  """Token ids [B, L] -> float32 logits [B, L, V] and per-MoE-layer aux outputs.

  `__call__` returns `(logits_BLV, aux)` where `aux = {"aux_loss": float32[] sum
  over MoE layers, "layers": {"layer_<i>": metrics dict}, "routes": {"layer_<i>":
  int32[B*L] top expert per token}, "loads": {"layer_<i>": float32[E]},
  "trace": {"layer_<i>": {"expert", "weight", "mask": [B*L, K]}}}` (the
  routing trace, `moejax.routing.replay`). Training passes
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
               step: jax.Array | None = None):
    cfg = self.config
    if cfg.dtype not in DTYPES:
      raise ConfigError(f"model.dtype={cfg.dtype!r}; valid: {', '.join(DTYPES)}")
    if cfg.d_model % cfg.num_heads:
      raise ConfigError(
          f"model.d_model={cfg.d_model} is not divisible by model.num_heads="
          f"{cfg.num_heads}")
    dtype = jnp.dtype(cfg.dtype)
    embed = self.param(
        "embedding",
        nn.with_logical_partitioning(_KERNEL_INIT, ("vocab", "embed")),
        (cfg.vocab_size, cfg.d_model), jnp.float32)
    pos = self.param(
        "position",
        nn.with_logical_partitioning(_KERNEL_INIT, (None, "embed")),
        (cfg.max_len, cfg.d_model), jnp.float32)
    length = tokens_BL.shape[1]
    cache_at, pos_LD = None, pos[:length]
    if self.decode:
      next_pos = self.variable("cache", "position", jnp.zeros, (), jnp.int32)
      cache_at = next_pos.value
      next_pos.value = cache_at + length
      pos_LD = jax.lax.dynamic_slice_in_dim(pos, cache_at, length)
    x_BLD = (embed[tokens_BL] + pos_LD).astype(dtype)
    aux_loss = jnp.zeros((), jnp.float32)
    layers, routes, loads, trace = {}, {}, {}, {}
    for i in range(cfg.num_layers):
      x_BLD, aux = Block(cfg, i in cfg.moe_layers, mesh=self.mesh,
                         name=block_name(i))(
          x_BLD, tokens_BL, deterministic, step, cache_at)
      if aux is not None:
        aux_loss = aux_loss + aux.aux_loss
        layers[layer_name(i)] = aux.metrics
        routes[layer_name(i)] = aux.top_expert_T
        loads[layer_name(i)] = aux.load_E
        trace[layer_name(i)] = aux.trace
    x_BLD = _norm("final_norm", dtype)(x_BLD)
    logits_BLV = jnp.einsum("bld,vd->blv", x_BLD.astype(jnp.float32), embed)
    return logits_BLV, {"aux_loss": aux_loss, "layers": layers, "routes": routes,
                        "loads": loads, "trace": trace}
