"""Workdirs are epath paths: local, or `gs://` through epath's fsspec backend.

`fake_gcs` puts an in-memory file system behind `gs://` for one test. Like GCS
it has no append, so code that appends to a workdir file fails here as it would
on a bucket. What runs against it: the config record and check, metric rows and
their truncation on resume, probes and the fluctuation curve, the tokenizer and
the packed-window cache, and `load_datasets` with a `gs://` workdir. Orbax
checkpoints (tensorstore's GCS driver) and TensorBoard files are not covered.
"""

import importlib
import os

import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem

from moejax.data import load_datasets, packing, tokenizer
from moejax.data.documents import Document
from moejax.metrics.fluctuation import FluctuationProbe, write_curve
from moejax.metrics.writers import MetricWriter, read_metrics
from moejax.paths import append_text, as_path, is_local, write_new
from moejax.train.workdir import check_workdir, record_config, saved_config
from tests.data.corpora import small_config, write_corpus


class FakeGCS(MemoryFileSystem):
  """`gs://bucket/...` held in memory; objects are written whole, never appended."""

  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs: list = [""]

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path).removeprefix("gs://").removeprefix("gcs://")
    path = path.strip("/")
    return "/" + path if path else ""

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode:
      raise NotImplementedError("GCS objects cannot be appended to")
    return super()._open(path, mode=mode, **kwargs)


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
  """`gs://` in memory for this test; the cwd is an empty folder, so a path
  mangled into a local one (`gs:/bucket/...`) would show up there."""
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = [""]
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  registry = importlib.import_module("fsspec.registry")._registry  # pylint: disable=protected-access
  for protocol in ("gs", "gcs"):
    monkeypatch.setitem(registry, protocol, FakeGCS)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  yield FakeGCS
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  assert not os.listdir(cwd), "a gs:// path was written to the local disk"


def test_gs_paths_stay_uris():
  path = as_path("gs://bucket/run") / "metrics.jsonl"
  assert os.fspath(path) == "gs://bucket/run/metrics.jsonl"
  assert not is_local(path) and is_local(as_path("/tmp/run"))
  assert os.fspath(as_path("~/run")) == os.path.expanduser("~/run")


def test_config_and_metrics_on_gs(fake_gcs):
  workdir = "gs://bucket/run"
  resolved = {"model": {"d_model": 32}, "train": {"steps": 10}}
  check_workdir(workdir, resolved)
  record_config(workdir, resolved)
  assert saved_config(workdir) == resolved
  record_config(workdir, {**resolved, "train": {"steps": 20}})
  assert "/bucket/run/config.1.json" in fake_gcs.store

  writer = MetricWriter(workdir, tensorboard=False)
  for step in (1, 2, 3):
    writer.write(step, {"train/loss": 1.0 / step, "stage_name": "train",
                        "router/load": np.full(4, step / 4)})
  writer.truncate_after(2)  # What a resume from step 2 does.
  assert [r["step"] for r in read_metrics(workdir)] == [1, 2]
  assert [r["step"] for r in read_metrics(workdir, "metrics.discarded.jsonl")] == [3]
  assert read_metrics(workdir, "router_loads.jsonl")[-1]["router/load"] == [0.5] * 4


def test_probes_and_curve_on_gs(fake_gcs):
  workdir = "gs://bucket/run"
  probe = FluctuationProbe(workdir)
  probe.save_inputs(np.arange(8).reshape(2, 4), np.zeros((2, 4), int), ("a",))
  routes = [np.array([0, 1, 2, 3]), np.array([0, 1, 2, 0]), np.array([0, 1, 2, 0])]
  rows = [probe.record(10 * (i + 1), {"layer_1": r}) for i, r in enumerate(routes)]
  assert rows[1]["router/fluctuation"] == 0.25 and rows[2]["router/fluctuation"] == 0
  curve = write_curve(workdir, probe)
  assert curve["settled_share"] == [0.75, 1.0, 1.0]
  assert epath.Path(f"{workdir}/fluctuation.png").read_bytes()[:4] == b"\x89PNG"
  resumed = FluctuationProbe(workdir)
  resumed.resume(20)
  assert resumed.record(30, {"layer_1": routes[2]})["router/fluctuation"] == 0


def test_tokenizer_and_packed_cache_on_gs(fake_gcs, tmp_path):
  write_corpus(tmp_path / "corpus")
  cfg = small_config(f"text:{tmp_path}/corpus/*.txt",
                     cache_dir=str(tmp_path / "cache"))
  data = load_datasets(cfg, workdir="gs://bucket/run", batch_size=4)
  saved = epath.Path("gs://bucket/run/tokenizer.model")
  assert saved.read_bytes() == data.tokenizer.serialized_model_proto()
  assert not write_new(saved, b"other")  # Never replaced.
  again = load_datasets(cfg, workdir="gs://bucket/run", batch_size=4)
  assert again.tokenizer.serialized_model_proto() == saved.read_bytes()

  sp = tokenizer.load_tokenizer(saved)
  corpus = [Document("x = 1\nprint(x)\n" * 20, "code")] * 3
  first = packing.load_or_pack(corpus[:2], corpus[2:], sp, 8, corpus_key="k",
                               cache_root="gs://bucket/cache")
  assert first.cache_dir.startswith("gs://bucket/cache/packed/")
  second = packing.load_or_pack(corpus[:2], corpus[2:], sp, 8, corpus_key="k",
                                cache_root="gs://bucket/cache")
  np.testing.assert_array_equal(second.train_tokens, first.train_tokens)


def test_append_and_write_new_on_local_paths(tmp_path):
  path = as_path(tmp_path) / "a" / "rows.jsonl"
  path.parent.mkdir()
  append_text(path, "1\n")
  append_text(path, "2\n")
  assert path.read_text() == "1\n2\n"
  target = as_path(tmp_path) / "b" / "file.bin"
  assert write_new(target, b"first") and not write_new(target, b"second")
  assert target.read_bytes() == b"first"
  assert sorted(os.listdir(target.parent)) == ["file.bin"]  # No temporary left.
