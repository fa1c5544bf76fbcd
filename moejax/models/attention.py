"""Attention masks of packed rows, masked attention, and cross-attention.

Shapes: B batch, L length (of the queries, and of the keys, which may differ:
a decoder attending to a source), H heads, A head width, D model width.

A row may pack several examples: `segments` int[B, L] numbers them 1, 2, ...
and marks padding 0. A query attends only to keys of its own segment (and,
causally, to none after it); padding attends to nothing and its attention
output is 0. Cross-attention pairs target segment s with source segment s.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

KERNEL_INIT = nn.initializers.normal(0.02)  # Every projection and embedding.


def kernel_init(axes: tuple[str | None, ...]):
  """`KERNEL_INIT` with logical axis names (`moejax.parallel.rules`)."""
  return nn.with_logical_partitioning(KERNEL_INIT, axes)


def segment_mask(q_segments_BL: jax.Array, k_segments_BL: jax.Array
                 ) -> jax.Array:
  """bool[B, 1, L, L]: query and key in the same segment, neither padding."""
  same_BLL = q_segments_BL[:, :, None] == k_segments_BL[:, None, :]
  real_BLL = (q_segments_BL[:, :, None] != 0) & (k_segments_BL[:, None, :] != 0)
  return (same_BLL & real_BLL)[:, None]


def self_mask(segments_BL: jax.Array, causal: bool) -> jax.Array:
  """bool[B, 1, L, L] of self-attention over packed rows, causal or not."""
  mask_B1LL = segment_mask(segments_BL, segments_BL)
  if not causal:
    return mask_B1LL
  length = segments_BL.shape[1]
  causal_LL = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
  return mask_B1LL & causal_LL


def attend(q_BLHA: jax.Array, k_BLHA: jax.Array, v_BLHA: jax.Array,
           mask_B1LL: jax.Array) -> jax.Array:
  """[B, L, H, A] softmax attention under `mask_B1LL`; a query that may attend
  to no key gets 0."""
  o_BLHA = jax.nn.dot_product_attention(q_BLHA, k_BLHA, v_BLHA,
                                        mask=mask_B1LL)
  any_BL = jnp.any(mask_B1LL[:, 0], axis=-1)
  return jnp.where(any_BL[:, :, None, None], o_BLHA, 0).astype(o_BLHA.dtype)


class CrossAttention(nn.Module):
  """Multi-head attention of the decoder's tokens to the encoder's output.

  With `cached` (decoding), the encoder's keys and values are computed on the
  first call (from `memory_BLD`) and kept in the `cache` collection; later
  calls read them and may pass `memory_BLD=None`.
  """

  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD: jax.Array, memory_BLD: jax.Array | None,
               cross_mask_B1LL: jax.Array, cached: bool = False) -> jax.Array:
    """[B, L, D] attending to [B, L, D] under `cross_mask_B1LL` -> [B, L, D]."""
    d_model = x_BLD.shape[-1]
    head_dim = d_model // self.num_heads
    q_BLHA = nn.DenseGeneral(
        (self.num_heads, head_dim), use_bias=False, dtype=self.dtype,
        kernel_init=kernel_init(("embed", "heads", "kv")), name="query")(x_BLD)
    if cached and self.has_variable("cache", "key"):
      k_BLHA = self.get_variable("cache", "key")
      v_BLHA = self.get_variable("cache", "value")
    else:
      kv = nn.DenseGeneral(
          (2, self.num_heads, head_dim), use_bias=False, dtype=self.dtype,
          kernel_init=kernel_init(("embed", None, "heads", "kv")),
          name="kv")(memory_BLD)
      k_BLHA, v_BLHA = kv[:, :, 0], kv[:, :, 1]
      if cached:
        self.put_variable("cache", "key", k_BLHA)
        self.put_variable("cache", "value", v_BLHA)
    o_BLHA = attend(q_BLHA, k_BLHA, v_BLHA, cross_mask_B1LL)
    return nn.DenseGeneral(
        d_model, axis=(-2, -1), use_bias=False, dtype=self.dtype,
        kernel_init=kernel_init(("heads", "kv", "embed")), name="out")(o_BLHA)
