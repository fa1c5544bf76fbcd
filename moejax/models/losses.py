"""Task losses of the encoder (masked LM) and encoder-decoder (seq2seq).

Shapes: B batch, L length, V vocabulary.

Each is a weighted mean of per-token cross-entropy (nats) over the positions
with weight > 0 (padding, unmasked tokens and other examples' slots weigh 0),
returned with its metrics: `loss`, `accuracy` (argmax equals the label,
weighted the same way) and `weight` (the sum of weights, the tokens scored).
"""

import jax
import jax.numpy as jnp
import optax


def weighted_cross_entropy(logits_BLV: jax.Array, labels_BL: jax.Array,
                           weights_BL: jax.Array, label_smoothing: float = 0.0
                           ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(float32[] loss, metrics): sum_t w_t CE_t / sum_t w_t, 0 when no weight.

  With `label_smoothing` eps the target puts 1 - eps on the label and eps
  spread evenly over V; accuracy is always against the label."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  weights_BL = weights_BL.astype(jnp.float32)
  vocab = logits_BLV.shape[-1]
  target_BLV = optax.smooth_labels(jax.nn.one_hot(labels_BL, vocab),
                                   label_smoothing)
  ce_BL = optax.softmax_cross_entropy(logits_BLV, target_BLV)
  total = jnp.sum(weights_BL)
  denom = jnp.maximum(total, 1e-9)
  loss = jnp.sum(ce_BL * weights_BL) / denom
  hit_BL = (jnp.argmax(logits_BLV, axis=-1) == labels_BL).astype(jnp.float32)
  return loss, {"loss": loss, "accuracy": jnp.sum(hit_BL * weights_BL) / denom,
                "weight": total}


def mlm_loss(logits_BLV: jax.Array, labels_BL: jax.Array,
             masked_BL: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Masked-LM loss: the encoder's logits against the original tokens
  `labels_BL` at the positions chosen for prediction (`masked_BL`, bool or
  weights), every other position ignored."""
  return weighted_cross_entropy(logits_BLV, labels_BL, masked_BL)


def seq2seq_loss(logits_BLV: jax.Array, targets_BL: jax.Array,
                 target_segments_BL: jax.Array, label_smoothing: float = 0.0
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Encoder-decoder loss: logits at target position t against the next target
  token `targets_BL[t]` (the batch holds them shifted), weighted 1 where
  `target_segments_BL` is not padding (0). Pass 0 also where a packed example
  has no next token."""
  return weighted_cross_entropy(logits_BLV, targets_BL,
                                target_segments_BL != 0, label_smoothing)
