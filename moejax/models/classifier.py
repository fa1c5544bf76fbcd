"""A sequence classifier on the bidirectional encoder: the encoder's final
hidden states mean-pooled over the non-padding tokens, one dense layer to the
classes.

Shapes: B batch, L length, D model width, O output width (of the head: one
logit per class).

Pooling is the mean over the tokens that are not `PAD_ID`, not a first-token
pooling: the encoder is pretrained on windows cut anywhere in a document, with
no classification token at their start, so no position is special. Padding is
also kept out of attention (the encoder runs with one segment per row, padding
0: `moejax.models.attention`), so a padded row's logits are the unpadded row's.
MoE layers still route the padding tokens (they count toward expert capacity).

The variables are the encoder's under `encoder` (every collection: params,
router state, hash tables) and the head's `params` under `head`;
`classifier_variables` builds them from a trained run's variables.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.data.tokenizer import PAD_ID
from moejax.models.attention import KERNEL_INIT
from moejax.models.config import TransformerConfig
from moejax.models.transformer import TransformerLM

ENCODER, HEAD = "encoder", "head"


def mean_pool(h_BLD: jax.Array, mask_BL: jax.Array) -> jax.Array:
  """float32[B, D]: the mean of each row's states where `mask_BL` is true (a
  row with none gives zeros)."""
  w_BL = mask_BL.astype(jnp.float32)
  sum_BD = jnp.einsum("bld,bl->bd", h_BLD.astype(jnp.float32), w_BL)
  return sum_BD / jnp.maximum(jnp.sum(w_BL, axis=1, keepdims=True), 1.0)


class ClassifierHead(nn.Module):
  """[B, L, D] states and a [B, L] token mask -> float32 logits [B, O]."""

  num_classes: int

  @nn.compact
  def __call__(self, h_BLD: jax.Array, mask_BL: jax.Array) -> jax.Array:
    return nn.Dense(self.num_classes, dtype=jnp.float32,
                    kernel_init=KERNEL_INIT, name="dense")(
                        mean_pool(h_BLD, mask_BL))


class SequenceClassifier(nn.Module):
  """Token ids [B, L] (right-padded with `PAD_ID`) -> (float32 logits [B, O],
  the encoder's aux dict, `TransformerLM`'s: `aux["aux_loss"]` is its MoE
  losses). Apply as the encoder is: `deterministic=False`, a `router` rng and
  `router_state` mutable when training."""

  config: TransformerConfig
  num_classes: int
  mesh: jax.sharding.Mesh | None = None

  @nn.compact
  def __call__(self, tokens_BL: jax.Array, *, deterministic: bool = True,
               step: jax.Array | None = None):
    mask_BL = tokens_BL != PAD_ID
    h_BLD, aux = TransformerLM(self.config, mesh=self.mesh, name=ENCODER)(
        tokens_BL, deterministic=deterministic, step=step,
        segments_BL=mask_BL.astype(jnp.int32), hidden=True)
    return ClassifierHead(self.num_classes, name=HEAD)(h_BLD, mask_BL), aux


def classifier_variables(encoder_variables: dict[str, Any], rng: jax.Array,
                         d_model: int, num_classes: int) -> dict[str, Any]:
  """`SequenceClassifier`'s variables: each collection of the encoder's (a
  trained run's `variables`) under `encoder`, and a fresh head drawn from
  `rng` (kernel N(0, 0.02), bias 0)."""
  head = ClassifierHead(num_classes).init(
      rng, jnp.zeros((1, 1, d_model)), jnp.ones((1, 1), bool))["params"]
  variables = {name: {ENCODER: tree} for name, tree in encoder_variables.items()}
  variables["params"] = {**variables.get("params", {}), HEAD: head}
  return variables
