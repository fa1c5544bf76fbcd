"""Streamed preparation: the same windows as the whole-corpus path, a cache that is
complete or absent, and bad input found deep inside a file."""

import dataclasses
import errno
import itertools

import numpy as np
import pytest

from moejax.data import documents as docs_lib
from moejax.data import load_datasets, packing, sources, stream, tokenizer
from moejax.errors import DataError
from tests.data.corpora import small_config

B = 4


def _whole_corpus_windows(cfg, files):
  """The packed windows of the path that reads every file whole (the reference)."""
  docs = sources.read_text_files(files, cfg.max_bytes)
  train, valid, test = docs_lib.carve_splits(docs, cfg.eval_fraction,
                                             cfg.test_fraction)
  sp = tokenizer.train_tokenizer(train, cfg.vocab_size, cfg.tokenizer_max_sentences)
  ids: dict[str, int] = {}
  out = {s: packing.pack(*packing.encode_documents(sp, d, ids), cfg.seq_len)
         for s, d in (("train", train), ("validation", valid), ("test", test))}
  return sp, out, tuple(ids)


def _same_as_whole_corpus(cfg, files, tmp_path):
  ds = load_datasets(cfg, workdir=tmp_path / "w", batch_size=B)
  sp, want, names = _whole_corpus_windows(cfg, files)
  assert ds.tokenizer.serialized_model_proto() == sp.serialized_model_proto()
  assert ds.domain_names == names
  [cache] = (tmp_path / "w/data/packed").iterdir()
  packed = packing._load(cache)  # pylint: disable=protected-access
  for split, (tokens, domains) in want.items():
    got = getattr(packed, split)
    np.testing.assert_array_equal(got.tokens(), tokens)
    np.testing.assert_array_equal(got.domains(), domains)
  assert ds.train_sequences == len(want["train"][0])


@pytest.mark.parametrize("max_bytes", [None, 30_000])
def test_streamed_windows_equal_the_whole_corpus_path(text_config, corpus_dir,
                                                      tmp_path, monkeypatch,
                                                      max_bytes):
  # Tiny blocks, pieces and shards: every boundary falls inside the corpus.
  monkeypatch.setattr(stream, "BLOCK_BYTES", 777)
  monkeypatch.setattr(packing, "PIECE_CHARS", 900)
  monkeypatch.setattr(packing, "GROUP_CHARS", 5000)
  monkeypatch.setattr(packing, "SHARD_TOKENS", 50 * 33 + 5)
  # Line ends of every kind str.splitlines knows, in a file of their own.
  text = (corpus_dir / "wrap.txt").read_text(encoding="utf-8")
  (corpus_dir / "crlf.txt").write_text(
      text.replace("\n", "\r\n", 300).replace("\n", "\u2028", 50)
      .replace("\n", "\x0c", 20), encoding="utf-8", newline="")
  cfg = dataclasses.replace(text_config, max_bytes=max_bytes, test_fraction=0.2)
  _same_as_whole_corpus(cfg, sources.text_files([f"{corpus_dir}/*.txt"]), tmp_path)


def test_streamed_windows_equal_on_the_shared_corpora(shared_data, tmp_path,
                                                      monkeypatch):
  monkeypatch.setattr(stream, "BLOCK_BYTES", 64 << 10)
  monkeypatch.setattr(packing, "PIECE_CHARS", 20_000)
  cfg = small_config(f"text:{shared_data}/*.txt", max_bytes=600_000,
                     vocab_size=600, eval_fraction=0.05, seq_len=64)
  _same_as_whole_corpus(cfg, sources.text_files([f"{shared_data}/*.txt"]), tmp_path)


def test_split_of_is_the_carve_rule():
  line = "x" * docs_lib.CHUNK_BYTES + "\n"  # One chunk per line.
  for n, ev, te in itertools.product(range(1, 30), (0.5, 0.25, 0.1),
                                     (0.0, 0.5, 0.2)):
    splits = docs_lib.carve_chunks([docs_lib.Document(line * n, "d")], ev, te)
    want = {c.index: name for name in ("train", "validation", "test")
            for c in getattr(splits, name)}
    got = {i: stream.split_of(i, n, ev, te) for i in range(n)}
    assert got == want, (n, ev, te)
    assert stream.held_out(n, ev, te) == {
        s: sum(v == s for v in got.values()) for s in ("validation", "test")}


def _packed(tmp_path):
  return sorted(p.name for p in (tmp_path / "w/data/packed").iterdir())


def test_failed_preparation_leaves_no_cache_and_a_rerun_restarts(
    text_config, tmp_path, monkeypatch):
  write = packing.ShardWriter._write  # pylint: disable=protected-access
  calls = []

  def failing(self, *a):
    calls.append(1)
    if len(calls) == 3:
      raise OSError(errno.ENOSPC, "No space left on device")
    return write(self, *a)
  monkeypatch.setattr(packing, "SHARD_TOKENS", 30 * 33)
  monkeypatch.setattr(packing.ShardWriter, "_write", failing)
  with pytest.raises(DataError, match="no space left on the device while writing "
                     "packed windows") as info:
    load_datasets(text_config, workdir=tmp_path / "w", batch_size=B)
  assert "\n" not in str(info.value)
  assert _packed(tmp_path) == []  # Neither a cache nor its temporary dir.
  # A killed preparation leaves its temporary dir: the next one removes it.
  monkeypatch.setattr(packing.ShardWriter, "_write", write)
  ds = load_datasets(text_config, workdir=tmp_path / "w", batch_size=B)
  [key] = _packed(tmp_path)
  packed_dir = tmp_path / "w/data/packed"
  (packed_dir / key).rename(packed_dir / f".{key}.12345.tmp")
  (packed_dir / f".{key}.12345.tmp" / packing.MARKER).unlink()
  again = load_datasets(text_config, workdir=tmp_path / "w", batch_size=B)
  assert _packed(tmp_path) == [key]
  np.testing.assert_array_equal(again.train[5]["inputs"], ds.train[5]["inputs"])


def test_corpus_changed_during_preparation_is_detected(text_config, corpus_dir,
                                                       tmp_path, monkeypatch):
  encode = packing._encode_groups  # pylint: disable=protected-access

  def appending(*a):
    with open(corpus_dir / "wrap.txt", "a", encoding="utf-8") as f:
      f.write("# an edit while the corpus is prepared\n")
    yield from encode(*a)
  monkeypatch.setattr(packing, "_encode_groups", appending)
  with pytest.raises(DataError, match=r"the corpus changed while it was prepared "
                     r"\(.*wrap.txt\); nothing was kept"):
    load_datasets(text_config, workdir=tmp_path / "w", batch_size=B)
  assert _packed(tmp_path) == []


@pytest.mark.parametrize("bad,what,skip", [
    (b"caf\xe9", "byte 0xe9 at offset", 3), (b"\0" * 64, "NUL byte at offset", 0)])
def test_bad_bytes_deep_in_a_file_name_the_offset_or_are_skipped(
    corpus_dir, tmp_path, monkeypatch, capsys, bad, what, skip):
  monkeypatch.setattr(stream, "BLOCK_BYTES", 4096)
  good = (corpus_dir / "prose.txt").read_bytes()
  at = good.index(b"\n", 9000) + 1
  (corpus_dir / "prose.txt").write_bytes(good[:at] + bad + b" tail\n" + good[at:])
  cfg = small_config(f"text:{corpus_dir}/*.txt")
  with pytest.raises(DataError, match=rf"prose.txt is (not UTF-8|binary) \({what} "
                     rf"{at + skip}\)") as info:
    load_datasets(cfg, workdir=tmp_path / "w", batch_size=B)
  assert "\n" not in str(info.value) and "data.bad_input=skip" in str(info.value)
  ds = load_datasets(dataclasses.replace(cfg, bad_input="skip"),
                     workdir=tmp_path / "w2", batch_size=B)
  err = capsys.readouterr().err
  assert f"skipped 1 line(s) of {corpus_dir / 'prose.txt'}" in err
  assert f"{what} {at + skip}" in err
  # The corpus without that line: the same windows as the file without it.
  (corpus_dir / "prose.txt").write_bytes(good)
  clean = load_datasets(cfg, workdir=tmp_path / "w3", batch_size=B)
  assert ds.train_sequences == clean.train_sequences
  np.testing.assert_array_equal(ds.train[0]["inputs"], clean.train[0]["inputs"])
