"""Masked-LM batches: the 15% choice and 80/10/10 rule within statistical bounds,
specials never chosen, masks fixed by (seed, step) and fresh per step."""

import dataclasses

import grain
import numpy as np
import pytest

from moejax.data import (EOS_ID, PAD_ID, load_datasets, mlm, packing, sources,
                         tokenizer)
from moejax.errors import DataError

V, MASK = 400, 4


def sigmas(count: int, n: int, p: float) -> float:
  """How many binomial standard deviations `count` of `n` lies from n * p."""
  return abs(count - n * p) / np.sqrt(n * p * (1 - p))


def test_choice_and_split_are_within_statistical_bounds():
  rng = np.random.default_rng(0)
  tokens = rng.integers(MASK + 1, V, 200_000).astype(np.int32)
  tokens[::50] = EOS_ID
  tokens[-5_000:] = PAD_ID  # A padded tail.
  out = mlm.mask_tokens(tokens, mlm.rng_for(0, 7), mask_id=MASK, vocab_size=V,
                        probability=0.15)
  chosen = out["weights"] == 1
  real = (tokens != PAD_ID) & (tokens != EOS_ID)
  assert not chosen[~real].any()  # Padding and EOS are never chosen.
  assert sigmas(chosen.sum(), real.sum(), 0.15) < 5
  n = int(chosen.sum())
  masked = chosen & (out["inputs"] == MASK)
  same = chosen & (out["inputs"] == tokens)
  other = chosen & ~masked & ~same
  assert sigmas(masked.sum(), n, 0.8) < 5
  # Unchanged: the 10% kept plus random draws that hit the same id (~1/395).
  assert sigmas(same.sum(), n, 0.1 + 0.1 / (V - MASK - 1)) < 5
  assert sigmas(other.sum(), n, 0.1 - 0.1 / (V - MASK - 1)) < 5
  assert out["inputs"][other].min() > MASK  # Random tokens are ordinary pieces.
  np.testing.assert_array_equal(out["inputs"][~chosen], tokens[~chosen])
  np.testing.assert_array_equal(out["targets"], tokens)
  assert out["weights"].dtype == np.float32 and out["inputs"].dtype == np.int32


def test_same_key_same_mask_and_new_steps_new_masks():
  tokens = np.random.default_rng(1).integers(5, V, 512).astype(np.int32)

  def draw(seed, index):
    return mlm.mask_tokens(tokens, mlm.rng_for(seed, index), mask_id=MASK,
                           vocab_size=V, probability=0.15)
  a, b = draw(0, 3), draw(0, 3)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  for other in (draw(0, 4), draw(1, 3)):
    assert not np.array_equal(a["weights"], other["weights"])


@pytest.fixture
def mlm_ds(text_config, tmp_path):
  cfg = dataclasses.replace(text_config, task="mlm")
  return load_datasets(cfg, workdir=tmp_path / "w", batch_size=4), cfg


def test_mlm_datasets_mask_lm_windows_per_step(mlm_ds, tmp_path):
  ds, cfg = mlm_ds
  sp = ds.tokenizer
  assert ds.mask_id == tokenizer.mask_id(sp) == 4 and sp.is_control(4)
  assert sp.id_to_piece(4) == tokenizer.MASK_PIECE
  assert 4 not in sp.encode("a <mask> b")  # Text never encodes to the mask.
  b = ds.train[2]
  assert set(b) == {"inputs", "targets", "weights", "domains"}
  assert all(v.shape == (4, cfg.seq_len) for v in b.values())
  chosen = b["weights"] == 1
  np.testing.assert_array_equal(b["inputs"][~chosen], b["targets"][~chosen])
  assert not np.isin(b["targets"][chosen], mlm.special_ids(ds.mask_id)).any()
  # Batch i is batch i again (resume), rows read alone equal it, and the
  # stream index fixes the mask: batch i's row r is sequence i * B + r.
  again = load_datasets(cfg, workdir=tmp_path / "w", batch_size=4).train[2]
  part = ds.train_rows(2, np.array([0, 3]))
  for k in b:
    np.testing.assert_array_equal(again[k], b[k])
    np.testing.assert_array_equal(part[k], b[k][[0, 3]])
  seq = ds.train_sequences_stream
  row = seq[2 * 4 + 1]
  np.testing.assert_array_equal(row["inputs"], b["inputs"][1])
  # Unmasked, row j of the stream is the LM stream's window j (the same packed
  # windows, shuffled alike), masked by its own index j.
  corpus = sources.open_corpus(cfg, tmp_path / "w" / "data")
  packed = packing.load_or_pack(corpus.train, corpus.validation, sp, cfg.seq_len,
                                corpus_key=corpus.key,
                                cache_root=tmp_path / "w" / "data")
  lm = grain.MapDataset.source(packing.PackedSequences(packed.train)).shuffle(
      seed=cfg.seed).repeat(None)
  for j in (0, 9, ds.train_sequences + 9):
    want = mlm.mlm_example(lm[j], j, seed=cfg.seed, mask_id=4,
                           vocab_size=sp.vocab_size(), probability=0.15)
    for k in want:
      np.testing.assert_array_equal(seq[j][k], want[k])
  eval_a = ds.eval_batches
  eval_b = load_datasets(cfg, workdir=tmp_path / "w", batch_size=4).eval_batches
  for x, y in zip(eval_a, eval_b):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
    assert x["weights"].sum() > 0


def test_mlm_needs_a_mask_symbol(tmp_path, text_config):
  ds = load_datasets(text_config, workdir=tmp_path / "w", batch_size=4)
  with pytest.raises(DataError, match="no <mask> symbol"):
    tokenizer.mask_id(ds.tokenizer)
  with pytest.raises(DataError, match="data.mlm_probability must be in"):
    load_datasets(dataclasses.replace(text_config, task="mlm", mlm_probability=1.5),
                  workdir=tmp_path / "x", batch_size=4)
