"""The masked-LM and seq2seq losses against a per-position loop."""

import jax
import jax.numpy as jnp
import numpy as np

from moejax.models.losses import mlm_loss, seq2seq_loss, weighted_cross_entropy

B, L, V = 2, 5, 7


def _inputs():
  logits = jax.random.normal(jax.random.key(0), (B, L, V)) * 3
  labels = jax.random.randint(jax.random.key(1), (B, L), 0, V)
  return logits, labels


def _loop(logits, labels, weights, eps=0.0):
  """(loss, accuracy): per position -log softmax, smoothed by hand."""
  logits, labels, weights = map(np.asarray, (logits, labels, weights))
  total = loss = hits = 0.0
  for b in range(B):
    for t in range(L):
      w = float(weights[b, t])
      z = logits[b, t].astype(np.float64)
      logp = z - z.max() - np.log(np.sum(np.exp(z - z.max())))
      ce = -(1 - eps) * logp[labels[b, t]] - eps * np.mean(logp)
      loss, total = loss + w * ce, total + w
      hits += w * float(np.argmax(z) == labels[b, t])
  return loss / total, hits / total


def test_mlm_loss_scores_only_the_masked_positions():
  logits, labels = _inputs()
  masked = jnp.asarray([[1, 0, 0, 1, 0], [0, 1, 1, 0, 0]], bool)
  loss, metrics = mlm_loss(logits, labels, masked)
  want_loss, want_acc = _loop(logits, labels, masked)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], want_acc, rtol=1e-6)
  assert float(metrics["weight"]) == 4
  # Logits at unmasked positions change nothing.
  noise = jax.random.normal(jax.random.key(2), logits.shape)
  again, _ = mlm_loss(jnp.where(masked[..., None], logits, noise), labels,
                      masked)
  assert float(again) == float(loss)


def test_seq2seq_loss_ignores_padding_and_smooths_labels():
  logits, labels = _inputs()
  segments = jnp.asarray([[1, 1, 2, 2, 0], [1, 1, 1, 0, 0]], jnp.int32)
  for eps in (0.0, 0.1):
    loss, metrics = seq2seq_loss(logits, labels, segments, label_smoothing=eps)
    want_loss, want_acc = _loop(logits, labels, segments != 0, eps)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], want_acc, rtol=1e-6)


def test_weights_scale_positions_and_no_weight_is_zero_loss():
  logits, labels = _inputs()
  weights = jnp.arange(B * L, dtype=jnp.float32).reshape(B, L) / 10
  loss, _ = weighted_cross_entropy(logits, labels, weights)
  np.testing.assert_allclose(loss, _loop(logits, labels, weights)[0], rtol=1e-5)
  zero, metrics = weighted_cross_entropy(logits, labels, jnp.zeros((B, L)))
  assert float(zero) == 0.0 and float(metrics["weight"]) == 0.0
  grads = jax.grad(lambda x: weighted_cross_entropy(x, labels,
                                                    jnp.zeros((B, L)))[0])(logits)
  assert np.all(np.isfinite(grads))
