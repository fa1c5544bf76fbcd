"""The sequence classifier on the encoder: its pooling is the per-example mean
over the real tokens, a padded row classifies as the unpadded row, and its
logits are the naive head over the encoder's own hidden states."""

import jax
import jax.numpy as jnp
import numpy as np

from moejax.data.tokenizer import PAD_ID
from moejax.models.classifier import (ENCODER, HEAD, SequenceClassifier,
                                      classifier_variables, mean_pool)
from moejax.models.config import MoEConfig, TransformerConfig
from moejax.models.transformer import TransformerLM, init_variables

B, L, D, V, O = 3, 8, 16, 40, 3  # O classes.


def _config(**overrides):
  base = dict(vocab_size=V, max_len=L, num_layers=2, d_model=D, num_heads=2,
              d_ff=32, arch="encoder", moe_layers=(), moe=MoEConfig())
  return TransformerConfig(**{**base, **overrides})


def _variables(config):
  lm = jax.jit(lambda: init_variables(TransformerLM(config), jax.random.key(0),
                                      jnp.zeros((1, L), jnp.int32)))()
  return classifier_variables(lm, jax.random.key(1), D, O)


def test_mean_pool_is_the_mean_over_each_rows_real_tokens():
  h_BLD = jax.random.normal(jax.random.key(0), (B, L, D))
  lengths = [8, 3, 0]  # A full row, a padded one, one with no token.
  mask_BL = np.arange(L)[None, :] < np.array(lengths)[:, None]
  pooled_BD = np.asarray(mean_pool(h_BLD, mask_BL))
  for b, n in enumerate(lengths):
    want = np.asarray(h_BLD[b, :n]).mean(0) if n else np.zeros(D)
    np.testing.assert_allclose(pooled_BD[b], want, rtol=1e-6, atol=1e-6)
  # What sits at the padding does not matter.
  noise_BLD = jnp.where(mask_BL[..., None], h_BLD, 1e3)
  np.testing.assert_allclose(mean_pool(noise_BLD, mask_BL), pooled_BD,
                             rtol=1e-6, atol=1e-6)


def test_a_padded_row_classifies_as_the_row_alone():
  config = _config()
  model = SequenceClassifier(config, O)
  variables = _variables(config)
  tokens_BL = np.array(jax.random.randint(jax.random.key(2), (B, L), 4, V))
  lengths = [8, 5, 2]
  tokens_BL[np.arange(L)[None, :] >= np.array(lengths)[:, None]] = PAD_ID

  @jax.jit  # One program: the batch, and each row alone at its length.
  def logits(variables, tokens_BL):
    return [model.apply(variables, tokens_BL)[0]] + [
        model.apply(variables, tokens_BL[b:b + 1, :n])[0][0]
        for b, n in enumerate(lengths)]

  logits_BO, *alone = logits(variables, tokens_BL)
  for b in range(B):
    np.testing.assert_allclose(logits_BO[b], alone[b], rtol=1e-5, atol=1e-5)


def test_logits_are_the_head_over_the_encoders_mean_hidden_state():
  # MoE blocks as well: the encoder sits under `encoder` with every collection.
  config = _config(moe_layers=(1,), moe=MoEConfig(num_experts=4))
  variables = _variables(config)
  tokens_BL = jax.random.randint(jax.random.key(3), (B, L), 4, V)
  lm_variables = {name: tree[ENCODER] for name, tree in variables.items()}
  lm, classifier = TransformerLM(config), SequenceClassifier(config, O)

  @jax.jit  # One program.
  def outputs(variables, lm_variables, tokens_BL):
    return (lm.apply(lm_variables, tokens_BL, hidden=True),
            lm.apply(lm_variables, tokens_BL),
            classifier.apply(variables, tokens_BL))

  (h_BLD, aux), (logits_BLV, lm_aux), (logits_BO, cls_aux) = outputs(
      variables, lm_variables, tokens_BL)
  # `hidden=True` leaves the LM's logits what the tied head makes of h.
  embed_VD = lm_variables["params"]["embedding"]
  np.testing.assert_allclose(np.einsum("bld,vd->blv", h_BLD, embed_VD),
                             logits_BLV, rtol=1e-5, atol=1e-5)
  head = variables["params"][HEAD]["dense"]
  want_BO = (np.asarray(h_BLD).mean(1) @ np.asarray(head["kernel"])
             + np.asarray(head["bias"]))
  np.testing.assert_allclose(logits_BO, want_BO, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cls_aux["aux_loss"], aux["aux_loss"], rtol=1e-6)
  assert float(lm_aux["aux_loss"]) == float(aux["aux_loss"]) > 0
  np.testing.assert_array_equal(head["bias"], np.zeros(O))
