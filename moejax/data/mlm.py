"""Masked-LM examples: BERT's 80/10/10 masking, drawn afresh for every step.

Shapes: B batch, L length (`data.seq_len`).

Each real token (not PAD, UNK, BOS, EOS or the mask itself) is chosen for
prediction with probability `data.mlm_probability` (0.15), independently; a
chosen token becomes the mask id with probability 0.8, a uniformly random
ordinary token (a byte or learned piece, never a special one) with 0.1, and stays
with 0.1. Masking is dynamic (RoBERTa): the draw of training sequence j of the
shuffled stream (row r of batch i is j = i * B + r) comes from a generator seeded
with (seed, j), so batch i is a pure function of (corpus, seed, i), a resumed run
masks exactly as the first did, and a sequence seen again in a later step gets
a new mask. Held-out batches are masked once, from their row numbers under a
salt of their own, and stay fixed.

An example (from an LM window's `inputs`, its first L tokens):
  inputs   int32[L]    the tokens with the chosen ones replaced
  targets  int32[L]    the original tokens (what to predict)
  weights  float32[L]  1 at the chosen positions, 0 elsewhere
  domains  int32[L]    the domain id of each token, as in LM batches
"""

import numpy as np

from moejax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

MASK_RATE, RANDOM_RATE = 0.8, 0.1  # Of the chosen tokens; the rest stay.
_TRAIN_SALT, _EVAL_SALT = 0x6D6C6D, 0x65766C  # Train and held-out draws differ.


def special_ids(mask_id: int) -> np.ndarray:
  """The ids that are never chosen nor drawn as random tokens."""
  return np.asarray(sorted({PAD_ID, UNK_ID, BOS_ID, EOS_ID, mask_id}), np.int32)


def mask_tokens(tokens_L: np.ndarray, rng: np.random.Generator, *, mask_id: int,
                vocab_size: int, probability: float
                ) -> dict[str, np.ndarray]:
  """{inputs, targets, weights} of `tokens_L` (any shape) masked by `rng`."""
  tokens_L = np.asarray(tokens_L, np.int32)
  special = special_ids(mask_id)
  # Random replacements: ordinary ids only, i.e. those above every special id
  # (the specials are 0..4, before the byte pieces).
  low = int(special.max()) + 1
  assert np.array_equal(special, np.arange(low)), special
  eligible = ~np.isin(tokens_L, special)
  chosen = eligible & (rng.random(tokens_L.shape) < probability)
  how = rng.random(tokens_L.shape)
  random_ids = rng.integers(low, vocab_size, tokens_L.shape, dtype=np.int32)
  inputs = np.where(chosen & (how < MASK_RATE), mask_id, tokens_L)
  inputs = np.where(chosen & (how >= MASK_RATE) & (how < MASK_RATE + RANDOM_RATE),
                    random_ids, inputs)
  return {"inputs": inputs.astype(np.int32), "targets": tokens_L,
          "weights": chosen.astype(np.float32)}


def rng_for(seed: int, index: int, held_out: bool = False) -> np.random.Generator:
  """The generator of sequence `index` (of the training stream, or held out)."""
  return np.random.default_rng([_EVAL_SALT if held_out else _TRAIN_SALT, seed,
                                int(index)])


def mlm_example(lm_example: dict[str, np.ndarray], index: int, *, seed: int,
                mask_id: int, vocab_size: int, probability: float,
                held_out: bool = False) -> dict[str, np.ndarray]:
  """The masked-LM example (module docstring) of an LM example (or batch: rows
  then take the indices index, index + 1, ...)."""
  tokens = np.asarray(lm_example["inputs"], np.int32)
  domains = np.asarray(lm_example["domains"], np.int32)
  if tokens.ndim == 1:
    out = mask_tokens(tokens, rng_for(seed, index, held_out), mask_id=mask_id,
                      vocab_size=vocab_size, probability=probability)
    return {**out, "domains": domains}
  rows = [mlm_example({"inputs": t, "domains": d}, index + r, seed=seed,
                      mask_id=mask_id, vocab_size=vocab_size,
                      probability=probability, held_out=held_out)
          for r, (t, d) in enumerate(zip(tokens, domains))]
  return {k: np.stack([row[k] for row in rows]) for k in rows[0]}
