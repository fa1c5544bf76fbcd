"""The shared data cache (`data.cache_dir`): a second workdir on the same corpus
prepares nothing, and runs preparing the same corpus at once take turns."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from moejax.data import cache as cache_lib
from moejax.data import load_datasets, packing, stream, tokenizer
from tests.data.corpora import small_config, snapshot

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_cache_dir_forms(monkeypatch, tmp_path):
  monkeypatch.setenv("MOEJAX_CACHE_DIR", str(tmp_path / "env"))
  assert cache_lib.cache_root(None, "/w") == tmp_path / "env"
  monkeypatch.delenv("MOEJAX_CACHE_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert cache_lib.cache_root(None, "/w") == tmp_path / "xdg" / "moejax"
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert os.fspath(cache_lib.cache_root(None, "/w")) == os.path.expanduser(
      "~/.cache/moejax")
  assert os.fspath(cache_lib.cache_root("", "/w")) == "/w/data"
  assert os.fspath(cache_lib.cache_root("gs://b/cache", "/w")) == "gs://b/cache"


def test_second_workdir_reuses_dataset_tokenizer_and_windows(
    text_config, tmp_path, monkeypatch):
  cfg = small_config(text_config.source, cache_dir=str(tmp_path / "cache"))
  first = load_datasets(cfg, workdir=tmp_path / "w1", batch_size=4)
  before = snapshot(tmp_path / "cache")
  assert any(k.startswith("tokenizers/") for k in before)
  assert not (tmp_path / "w1" / "data").exists()

  monkeypatch.setattr(tokenizer, "train_tokenizer",
                      lambda *a: pytest.fail("tokenizer trained again"))
  monkeypatch.setattr(packing, "_encode_groups",
                      lambda *a: pytest.fail("windows packed again"))
  monkeypatch.setattr(stream, "text_chunks",
                      lambda *a: pytest.fail("corpus read again"))
  second = load_datasets(cfg, workdir=tmp_path / "w2", batch_size=4)
  assert snapshot(tmp_path / "cache") == before
  assert ((tmp_path / "w2" / "tokenizer.model").read_bytes()
          == (tmp_path / "w1" / "tokenizer.model").read_bytes())
  assert (second.train[3]["inputs"] == first.train[3]["inputs"]).all()


_PREPARE = textwrap.dedent("""
    import os, pathlib, sys, time
    from moejax.data import load_datasets, tokenizer
    from tests.data.corpora import small_config
    trained = []
    train = tokenizer.train_tokenizer
    tokenizer.train_tokenizer = lambda *a: trained.append(1) or train(*a)
    go = pathlib.Path(sys.argv[3])
    while not go.exists():  # Both processes start preparing at the same moment.
      time.sleep(0.01)
    load_datasets(small_config(sys.argv[1], cache_dir=sys.argv[2]),
                  workdir=sys.argv[4], batch_size=4)
    print("trained" if trained else "reused")
""")


def test_two_runs_preparing_one_corpus_at_once_take_turns(text_config, tmp_path):
  cache, go = tmp_path / "cache", tmp_path / "go"
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  procs = [subprocess.Popen(
      [sys.executable, "-c", _PREPARE, text_config.source, str(cache), str(go),
       str(tmp_path / f"w{i}")], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  go.touch()
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
  # One prepared everything under the lock; the other found it ready.
  assert sorted(out.split()[-1] for out, _ in outs) == ["reused", "trained"]
  assert len(list((cache / "packed").iterdir())) == 1
  assert len(list((cache / "tokenizers").iterdir())) == 1
  assert ((tmp_path / "w0" / "tokenizer.model").read_bytes()
          == (tmp_path / "w1" / "tokenizer.model").read_bytes())
