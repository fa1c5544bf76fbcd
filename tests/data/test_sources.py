"""The three source forms: parsing, the embedded corpus, `text:` streamed."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import pytest

from moejax.data import documents as docs_lib
from moejax.data import embedded, load_datasets, sources, stream
from moejax.data.documents import Document
from tests.data.corpora import small_config


def test_parse_source_forms():
  assert sources.parse_source("embedded").kind == "embedded"
  assert sources.parse_source("text:a.txt, b/*.md").patterns == ("a.txt", "b/*.md")
  spec = sources.parse_source("tfds:lm1b:1.1.0:train[:10%]")
  assert (spec.name, spec.split) == ("lm1b:1.1.0", "train[:10%]")
  spec = sources.parse_source("tfds:wikipedia/20230601.en")
  assert (spec.name, spec.split) == ("wikipedia/20230601.en", "train")


def test_import_is_light():
  code = ("import sys, moejax.data; heavy = {'tensorflow_datasets', 'grain', "
          "'sentencepiece', 'tensorflow'} & set(sys.modules); print(sorted(heavy))")
  root = str(pathlib.Path(__file__).resolve().parents[2])
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, cwd=root, env={**os.environ, "PYTHONPATH": root})
  assert out.stdout.strip() == "[]"


def test_embedded_corpus_is_deterministic_two_domain_and_capped():
  first = embedded.documents(40_000)
  assert first == embedded.documents(40_000)
  assert {d.domain for d in first} == {"code", "docs"}
  sizes = {dom: sum(docs_lib.utf8_len(d.text) for d in first if d.domain == dom)
           for dom in ("code", "docs")}
  assert sum(sizes.values()) <= 40_000
  # Half each: both domains are larger than 20 KB, and cuts fall at line ends.
  assert 19_000 <= sizes["code"] <= 20_000 and 19_000 <= sizes["docs"] <= 20_000
  assert first[0].text.startswith((embedded.stdlib_dir() / "__future__.py").read_text())


def test_embedded_skips_tests_and_site_packages():
  root = embedded.stdlib_dir()
  rel = [p.relative_to(root).parts for p in embedded.code_files()]
  assert rel == sorted(rel, key="/".join)
  assert not any(set(parts) & embedded.SKIP_DIRS for parts in rel)
  assert ("json", "decoder.py") in rel


def test_embedded_loads_as_datasets(tmp_path):
  cfg = small_config("embedded", max_bytes=40_000, vocab_size=500)
  ds = load_datasets(cfg, workdir=tmp_path / "w", batch_size=4)
  assert ds.domain_names == ("code", "docs")
  assert ds.train[0]["inputs"].shape == (4, 32)


def _packed_dirs(workdir):
  return sorted((workdir / "data" / "packed").iterdir())


@pytest.mark.parametrize("max_bytes", [None, 24_000])
def test_text_glob_streams_the_whole_file_carve(text_config, corpus_dir,
                                                 monkeypatch, max_bytes):
  # Blocks far smaller than the files: the stream cuts them at many places.
  monkeypatch.setattr(stream, "BLOCK_BYTES", 1000)
  cfg = dataclasses.replace(text_config, max_bytes=max_bytes, test_fraction=0.2)
  corpus = sources.open_corpus(cfg, None)
  files = sources.text_files([f"{corpus_dir}/*.txt"])
  docs = sources.read_text_files(files, max_bytes)
  assert [d.domain for d in docs] == ["json", "prose", "wrap"]  # One per file.
  want = docs_lib.carve_splits(docs, cfg.eval_fraction, cfg.test_fraction)
  got = (list(corpus.train), list(corpus.validation), list(corpus.test))
  assert got == tuple(want)
  assert {d.domain for d in got[1]} == {"json", "prose", "wrap"}


def test_packed_cache_is_reused_then_rebuilt_on_change(text_config, corpus_dir,
                                                       tmp_path):
  workdir = tmp_path / "w"
  load_datasets(text_config, workdir=workdir, batch_size=4)
  [first] = _packed_dirs(workdir)
  stamp = {p: p.stat().st_mtime_ns for p in first.iterdir()}
  load_datasets(text_config, workdir=workdir, batch_size=4)
  assert _packed_dirs(workdir) == [first]
  assert stamp == {p: p.stat().st_mtime_ns for p in first.iterdir()}
  with open(corpus_dir / "prose.txt", "a", encoding="utf-8") as f:
    f.write("One more line of prose.\n" * 100)
  load_datasets(text_config, workdir=workdir, batch_size=4)
  assert len(_packed_dirs(workdir)) == 2 and first in _packed_dirs(workdir)


def test_text_max_bytes_is_shared_between_files(corpus_dir):
  files = sources.text_files([f"{corpus_dir}/*.txt"])
  docs = sources.read_text_files(files, 24_000)
  sizes = {d.domain: docs_lib.utf8_len(d.text) for d in docs}
  # 8,000 bytes each, cut back to the previous line end.
  assert all(7_000 < s <= 8_000 for s in sizes.values()), sizes


@pytest.mark.parametrize("pattern", ["{d}/json.txt,{d}/*.txt", "{d}/wrap.txt"])
def test_text_files_in_order_without_duplicates(corpus_dir, pattern):
  patterns = pattern.format(d=corpus_dir).split(",")
  names = [p.name for p in sources.text_files(patterns)]
  assert names == (["json.txt", "prose.txt", "wrap.txt"] if "*" in pattern
                   else ["wrap.txt"])


def test_shared_corpora_give_three_domains(shared_data, tmp_path):
  cfg = small_config(f"text:{shared_data}/*.txt", max_bytes=90_000, vocab_size=600,
                     eval_fraction=0.1)
  ds = load_datasets(cfg, workdir=tmp_path / "w", batch_size=8)
  assert ds.domain_names == ("linux-kernel", "tinyshakespeare", "wikitext2-valid")
  seen = {int(d) for b in ds.eval_batches for d in b["domains"].ravel()}
  assert seen == {0, 1, 2}
