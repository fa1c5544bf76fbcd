"""Token losses of every task: next-token LM, masked LM and seq2seq.

Shapes: B batch, L length, V vocabulary.

One mechanism: `token_cross_entropy` gives the per-token cross-entropy (nats),
`loss_sums` its weighted sum with the tokens scored and the correct argmax
predictions among them. Sums, not means, so that a caller can add them over
micro-batches, devices or eval batches before dividing (the trainer,
`moejax.train.step`, and the evaluator do). `weighted_cross_entropy` divides:
the weighted mean over the positions with weight > 0 (padding, unmasked tokens
and other examples' slots weigh 0), with its metrics `loss`, `accuracy` and
`weight` (the tokens scored).
"""

import jax
import jax.numpy as jnp
import optax


def token_cross_entropy(logits_BLV: jax.Array, labels_BL: jax.Array,
                        label_smoothing: float = 0.0) -> jax.Array:
  """float32[B, L] cross-entropy of each position against its label. With
  `label_smoothing` eps the target puts 1 - eps on the label and eps spread
  evenly over V."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits_BLV, labels_BL)
  target_BLV = optax.smooth_labels(
      jax.nn.one_hot(labels_BL, logits_BLV.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits_BLV, target_BLV)


def loss_sums(logits_BLV: jax.Array, labels_BL: jax.Array,
              weights_BL: jax.Array | None = None,
              label_smoothing: float = 0.0) -> dict[str, jax.Array]:
  """{"loss_sum", "correct", "tokens"}: float32[] sums over the positions of
  cross-entropy * weight, (argmax == label) * weight and the weights (every
  position weighs 1 without `weights_BL`). Accuracy is always against the
  label."""
  ce_BL = token_cross_entropy(logits_BLV, labels_BL, label_smoothing)
  hit_BL = (jnp.argmax(logits_BLV, axis=-1) == labels_BL).astype(jnp.float32)
  if weights_BL is None:
    return {"loss_sum": jnp.sum(ce_BL), "correct": jnp.sum(hit_BL),
            "tokens": jnp.asarray(ce_BL.size, jnp.float32)}
  w_BL = weights_BL.astype(jnp.float32)
  return {"loss_sum": jnp.sum(ce_BL * w_BL), "correct": jnp.sum(hit_BL * w_BL),
          "tokens": jnp.sum(w_BL)}


def weighted_cross_entropy(logits_BLV: jax.Array, labels_BL: jax.Array,
                           weights_BL: jax.Array, label_smoothing: float = 0.0
                           ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(float32[] loss, metrics): sum_t w_t CE_t / sum_t w_t, 0 when no weight."""
  sums = loss_sums(logits_BLV, labels_BL, weights_BL, label_smoothing)
  denom = jnp.maximum(sums["tokens"], 1e-9)
  loss = sums["loss_sum"] / denom
  return loss, {"loss": loss, "accuracy": sums["correct"] / denom,
                "weight": sums["tokens"]}


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
