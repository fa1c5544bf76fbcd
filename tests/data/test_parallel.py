"""The `parallel:` source: aligned pairs, its one-line errors, the joint tokenizer,
and packed seq2seq rows against a naive reference."""

import dataclasses

import numpy as np
import pytest

from moejax.data import BOS_ID, EOS_ID, load_datasets, parallel, seq2seq, tokenizer
from moejax.data.pipeline import validate
from moejax.errors import DataError
from tests.data.corpora import (PAIRS as N, side_lines, small_config, snapshot,
                                source_of, write_pair)


@pytest.fixture
def pair_paths(tmp_path):
  src, tgt = side_lines()
  src[7], tgt[9] = "   ", ""  # Two pairs with a blank side: skipped.
  return write_pair(tmp_path / "pairs", src, tgt)


def seq2seq_config(paths, **overrides):
  base = dict(task="seq2seq", seq_len=48, target_len=40, overlong="truncate",
              eval_fraction=0.125, vocab_size=400)
  return small_config(source_of(paths), **{**base, **overrides})


def test_pairs_are_the_aligned_lines_with_a_stride_held_out(pair_paths):
  corpus = parallel.ParallelCorpus(source_of(pair_paths), 0.125, 0.0)
  src = pair_paths[0].read_text().split("\n")[:-1]
  tgt = pair_paths[1].read_text().split("\n")[:-1]
  assert corpus.num_pairs == N
  pairs = list(corpus.pairs())
  want = [(j, s, t) for j, (s, t) in enumerate(zip(src, tgt))
          if s.strip() and t.strip()]
  assert [(p.index, p.source, p.target) for p in pairs] == want
  assert [p.line for p in pairs] == [j + 1 for j, _, _ in want]
  held = [p.index for p in pairs if p.split == "validation"]
  assert held == [j for j, _, _ in want if j % 8 == 7]
  assert [p.index for p in corpus.pairs("train")] == [
      j for j, _, _ in want if j % 8 != 7]
  # A test split: the text carve's second stride, on the pairs validation left.
  with_test = parallel.ParallelCorpus(source_of(pair_paths), 0.125, 0.25)
  rest = [j for j in range(N) if j % 8 != 7]
  test = {j for r, j in enumerate(rest) if r % 4 == 3}
  assert {p.index for p in with_test.pairs("test")} == test  # 7, 9: not test.
  assert [p.index for p in with_test.pairs("validation")] == held


def test_bad_parallel_input_is_one_line_naming_the_files(tmp_path):
  src, tgt = side_lines()
  paths = write_pair(tmp_path / "a", src, tgt[:-3])
  with pytest.raises(DataError, match=rf"{paths[0]} has {N} lines but "
                     rf"{paths[1]} has {N - 3}") as e:
    parallel.ParallelCorpus(source_of(paths), 0.1, 0.0)
  assert "\n" not in str(e.value)
  paths = write_pair(tmp_path / "b", src[:4], ["", " ", "", ""])
  with pytest.raises(DataError, match=rf"target side .* is empty \({paths[1]}"):
    parallel.ParallelCorpus(source_of(paths), 0.1, 0.0)
  paths = write_pair(tmp_path / "c", src, tgt)
  data = paths[1].read_bytes().split(b"\n")
  data[41] += b"\xff"
  paths[1].write_bytes(b"\n".join(data))
  with pytest.raises(DataError, match=rf"{paths[1]} line 42 is not UTF-8"):
    parallel.ParallelCorpus(source_of(paths), 0.1, 0.0)
  write_pair(tmp_path / "d", src, tgt, names=("x.txt", "y.txt"))
  with pytest.raises(DataError, match="matches 1 file.* matches 2"):
    parallel.ParallelCorpus(f"parallel:{paths[0]},{tmp_path}/d/*.txt", 0.1, 0.0)
  for bad in ("parallel:only_one.txt", "parallel:a.txt,b.txt,c.txt"):
    with pytest.raises(DataError, match="must name two sides"):
      validate(small_config(bad, task="seq2seq"))
  with pytest.raises(DataError, match="needs data.task=seq2seq"):
    validate(small_config(source_of(paths)))
  with pytest.raises(DataError, match="data.overlong must be"):
    validate(seq2seq_config(paths, overlong="drop"))


def test_joint_sample_takes_both_sides_evenly(pair_paths):
  corpus = parallel.ParallelCorpus(source_of(pair_paths), 0.125, 0.0)
  train = list(corpus.pairs("train"))
  sample = parallel.sample_sides(corpus, 40)
  src = [p.source for p in train]
  tgt = [p.target for p in train]
  assert sample == ([src[i * len(src) // 20] for i in range(20)]
                    + [tgt[i * len(tgt) // 20] for i in range(20)])


def test_joint_vocabulary_learns_both_sides(pair_paths, tmp_path):
  ds = load_datasets(seq2seq_config(pair_paths, vocab_size=500),
                     workdir=tmp_path / "w", batch_size=4)
  corpus = parallel.ParallelCorpus(source_of(pair_paths), 0.125, 0.0)
  only = {side: tokenizer.train_on_lines(
      [getattr(p, side) for p in corpus.pairs("train")], 500)
      for side in ("source", "target")}
  for side, other in (("source", "target"), ("target", "source")):
    text = "\n".join(getattr(p, side) for p in corpus.pairs("train"))
    joint = len(ds.tokenizer.encode(text))
    # The joint model encodes each side nearly as tightly as a model of that
    # side alone, and clearly tighter than a model of the other side.
    assert joint < len(only[other].encode(text)) * 0.9
    assert joint < len(only[side].encode(text)) * 1.25


def naive_rows(examples, S, T):
  """Greedy packing written out plainly: lists of (source + EOS, target + EOS)."""
  rows, row, s, t = [], [], 0, 0
  for src, tgt in examples:
    ns, nt = len(src) + 1, len(tgt) + 1
    if row and (s + ns > S or t + nt > T):
      rows.append(row)
      row, s, t = [], 0, 0
    row.append((src + [EOS_ID], tgt + [EOS_ID]))
    s, t = s + ns, t + nt
  return rows + ([row] if row else [])


def test_packed_rows_equal_a_naive_packing(pair_paths, tmp_path):
  cfg = seq2seq_config(pair_paths)
  ds = load_datasets(cfg, workdir=tmp_path / "w", batch_size=4)
  S, T = 48, 40  # pylint: disable=invalid-name
  corpus = parallel.ParallelCorpus(cfg.source, cfg.eval_fraction, 0.0)
  sp = ds.tokenizer
  for split, n in (("train", ds.train_sequences), ("validation", ds.eval_sequences)):
    examples = [(sp.encode(p.source)[:S - 1], sp.encode(p.target)[:T - 1])
                for p in corpus.pairs(split)]
    want = naive_rows(examples, S, T)
    assert len(want) == n
    packed = seq2seq.load_or_pack_pairs(corpus, sp, S, T, overlong="truncate",
                                        cache_root=tmp_path / "w" / "data")
    seq = seq2seq.PackedRows(getattr(packed, split), S)
    assert len(seq) == n
    for row, packed in zip((seq[i] for i in range(n)), want):
      enc, dec = [], []
      for k, (src, tgt) in enumerate(packed, start=1):
        enc += [(tok, k, pos) for pos, tok in enumerate(src)]
        dec += [(tok, inp, k, pos) for pos, (tok, inp)
                in enumerate(zip(tgt, [BOS_ID] + tgt[:-1]))]
      enc += [(0, 0, 0)] * (S - len(enc))
      dec += [(0, 0, 0, 0)] * (T - len(dec))
      assert list(zip(row["encoder_input_tokens"], row["encoder_segment_ids"],
                      row["encoder_positions"])) == enc
      assert list(zip(row["decoder_target_tokens"], row["decoder_input_tokens"],
                      row["decoder_segment_ids"], row["decoder_positions"])) == dec
      np.testing.assert_array_equal(row["decoder_loss_weights"],
                                    row["decoder_segment_ids"] > 0)
  # Tokens counted for hash routing: the training rows' real tokens.
  assert ds.token_counts[0] == 0 and ds.token_counts.sum() == ds.train_tokens


def test_seq2seq_batches_shapes_determinism_rows_and_cache(pair_paths, tmp_path):
  cfg = seq2seq_config(pair_paths)
  ds = load_datasets(cfg, workdir=tmp_path / "w", batch_size=4)
  b = ds.train[3]
  assert set(b) == set(seq2seq.KEYS) and ds.task == "seq2seq"
  for k, v in b.items():
    assert v.shape == (4, 48 if k.startswith("encoder") else 40), k
    assert v.dtype == (np.float32 if k.endswith("weights") else np.int32), k
  rows = np.array([1, 3])
  part = ds.train_rows(3, rows)
  for k in b:
    np.testing.assert_array_equal(part[k], b[k][rows])
  before = snapshot(tmp_path / "w")
  again = load_datasets(cfg, workdir=tmp_path / "w", batch_size=4)
  assert snapshot(tmp_path / "w") == before  # Reused: nothing rewritten.
  for k in b:
    np.testing.assert_array_equal(again.train[3][k], b[k])
  assert ds.eval_batches and set(ds.eval_batches[0]) == set(seq2seq.KEYS)


def test_overlong_pair_is_an_error_naming_its_line(pair_paths, tmp_path):
  cfg = seq2seq_config(pair_paths, overlong="error", seq_len=12, target_len=12)
  with pytest.raises(DataError, match=r"line \d+ is longer than a row: source \d+ "
                     r"tokens \(data.seq_len=12\), target \d+ tokens") as e:
    load_datasets(cfg, workdir=tmp_path / "w", batch_size=2)
  assert "\n" not in str(e.value) and str(pair_paths[0]) in str(e.value)
  assert not (tmp_path / "w" / "tokenizer.model").exists()
  ds = load_datasets(dataclasses.replace(cfg, overlong="truncate"),
                     workdir=tmp_path / "w", batch_size=2)
  assert ds.train[0]["encoder_segment_ids"].shape == (2, 12)


def test_tfds_translation_pairs(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  src, tgt = side_lines()

  class MoejaxTestPairs(tfds.core.GeneratorBasedBuilder):
    """Train and validation splits of (en, es) records."""
    VERSION = tfds.core.Version("1.0.0")
    code_path = None

    def __init__(self, **kwargs):
      super().__init__(file_format="array_record", **kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.Translation(languages=["en", "es"]),
          disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(0, 140),
              "validation": self._generate_examples(140, N)}

    def _generate_examples(self, start, stop):
      for i in range(start, stop):
        yield i, {"en": tgt[i], "es": src[i]}

  data_dir = tmp_path / "tfds"
  MoejaxTestPairs(data_dir=str(data_dir)).download_and_prepare()
  cfg = small_config("tfds:moejax_test_pairs", task="seq2seq", seq_len=48,
                     target_len=40, overlong="truncate", languages="es,en",
                     tfds_data_dir=str(data_dir), eval_fraction=0.125)
  ds = load_datasets(cfg, workdir=tmp_path / "w", batch_size=4)
  corpus = parallel.TfdsPairs("moejax_test_pairs", "train", "es,en", 0.125, 0.0,
                              str(data_dir))
  pairs = list(corpus.pairs())
  assert [(p.split, p.source, p.target) for p in pairs] == (
      [("train", src[i], tgt[i]) for i in range(140)]
      + [("validation", src[i], tgt[i]) for i in range(140, N)])
  sp = ds.tokenizer
  for split, n in (("train", ds.train_sequences), ("validation", ds.eval_sequences)):
    examples = [(sp.encode(p.source)[:47], sp.encode(p.target)[:39])
                for p in corpus.pairs(split)]
    assert len(naive_rows(examples, 48, 40)) == n
  first = ds.eval_batches[0]
  assert first["encoder_input_tokens"].shape == (4, 48)
  with pytest.raises(DataError, match=r"has text features \['en', 'es'\]; set "
                     "data.languages"):
    parallel.TfdsPairs("moejax_test_pairs", "train", "de,en", 0.1, 0.0,
                       str(data_dir))
