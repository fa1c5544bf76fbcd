"""Every bad input is one DataError line naming the problem and the fix; the workdir
keeps every file it had."""

import dataclasses

import pytest

from moejax.data import DataConfig, load_datasets, validate
from moejax.errors import DataError
from tests.data.corpora import small_config, snapshot


@pytest.fixture
def workdir(tmp_path):
  """A workdir that already holds files of an earlier run."""
  w = tmp_path / "w"
  (w / "data").mkdir(parents=True)
  (w / "notes.txt").write_text("do not touch\n")
  (w / "data" / "keep.npy").write_bytes(b"\x93NUMPY fake")
  return w


def _fails(cfg, workdir, match, batch_size=4):
  before = snapshot(workdir)
  with pytest.raises(DataError, match=match) as info:
    load_datasets(cfg, workdir=workdir, batch_size=batch_size)
  assert "\n" not in str(info.value)
  assert {k: v for k, v in snapshot(workdir).items() if k in before} == before
  assert not (workdir / "tokenizer.model").exists() or "tokenizer.model" in before
  return str(info.value)


def test_unknown_scheme_lists_valid_forms(workdir):
  msg = _fails(small_config("hf:wikitext"), workdir,
               "unknown data.source 'hf:wikitext'")
  for form in ("embedded", "text:<path or glob>", "tfds:<name>[:split]"):
    assert form in msg


def test_glob_matching_nothing(workdir, tmp_path):
  _fails(small_config(f"text:{tmp_path}/nothing/*.txt"), workdir,
         r"matches no file .*fix the path or glob")
  _fails(small_config(f"text:{tmp_path}/missing.txt"), workdir, "does not exist")


def test_directory_instead_of_files(workdir, corpus_dir):
  _fails(small_config(f"text:{corpus_dir}"), workdir,
         r"is a directory; give its files, e.g. text:.*\*\.txt")
  _fails(small_config(f"text:{corpus_dir.parent}/*"), workdir,
         "matches only directories")


def test_empty_corpus(workdir, tmp_path):
  (tmp_path / "a.txt").write_text("")
  (tmp_path / "b.txt").write_text("  \n\n\t\n")
  _fails(small_config(f"text:{tmp_path}/*.txt"), workdir,
         r"the text corpus is empty \(2 file\(s\), all empty or whitespace\)")


def test_binary_file_names_file_and_offset(workdir, corpus_dir):
  (corpus_dir / "blob.txt").write_bytes(b"fine text\n\x00\x01\x02")
  _fails(small_config(f"text:{corpus_dir}/*.txt"), workdir,
         r"blob.txt is binary \(NUL byte at offset 10\)")


def test_non_utf8_file_names_file_and_offset(workdir, corpus_dir):
  (corpus_dir / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
  _fails(small_config(f"text:{corpus_dir}/*.txt"), workdir,
         r"latin1.txt is not UTF-8 \(byte 0xe9 at offset 3\); convert it to UTF-8")


def test_corpus_too_small_for_one_batch(workdir, text_config):
  msg = _fails(text_config, workdir, "too small for one training batch",
               batch_size=100_000)
  assert "sequences of length 32" in msg
  assert "lower train.batch_size or data.seq_len, or add text" in msg


def test_corpus_too_small_to_hold_out(workdir, tmp_path):
  (tmp_path / "one.txt").write_text("a single short line\n")
  _fails(small_config(f"text:{tmp_path}/one.txt"), workdir,
         "too small to hold out validation text")


@pytest.mark.parametrize("field,value,match", [
    ("seq_len", 0, "data.seq_len must be a positive integer, got 0"),
    ("vocab_size", -5, "data.vocab_size must be a positive integer, got -5"),
    ("vocab_size", 256, "data.vocab_size=256 leaves no room for text pieces"),
    ("eval_batches", 0, "data.eval_batches must be a positive integer"),
    ("eval_fraction", 0.0, r"data.eval_fraction must be in \(0, 0.5\], got 0.0"),
    ("eval_fraction", 0.6, r"data.eval_fraction must be in \(0, 0.5\], got 0.6"),
    ("max_bytes", 0, "data.max_bytes must be a positive integer"),
])
def test_validate_rejects_bad_values(workdir, field, value, match):
  cfg = dataclasses.replace(DataConfig(), **{field: value})
  with pytest.raises(DataError, match=match):
    validate(cfg)
  _fails(cfg, workdir, match)


def test_non_positive_batch_size(workdir):
  _fails(DataConfig(), workdir, "batch_size must be a positive integer, got 0",
         batch_size=0)
