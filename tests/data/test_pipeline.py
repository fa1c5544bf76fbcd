"""`load_datasets`: batches by index (resumable), epochs, held-out batches, `tfds:`."""

import dataclasses

import numpy as np
import pytest
import tensorflow_datasets as tfds

from moejax.data import documents as docs_lib
from moejax.data import load_datasets, sources, text_builder
from moejax.data import tfds_source
from moejax.data.documents import Document
from moejax.errors import DataError
from tests.data.corpora import small_config, stdlib_texts

B = 4


def _same_batch(a, b):
  assert a.keys() == b.keys() == {"inputs", "targets", "domains"}
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def _window_ids(ds, packed_rows, batches):
  """The packed-window index of every row of `ds.train[0..batches)`, in order."""
  index = {row.tobytes(): i for i, row in enumerate(packed_rows)}
  assert len(index) == len(packed_rows)  # Windows are distinct in real text.
  out = []
  for i in range(batches):
    batch = ds.train[i]
    rows = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    out += [index[r.tobytes()] for r in rows]
  return out


def test_batch_i_is_the_same_in_independent_builds(text_config, tmp_path):
  a = load_datasets(text_config, workdir=tmp_path / "a", batch_size=B)
  b = load_datasets(text_config, workdir=tmp_path / "b", batch_size=B)
  for i in (0, 1, 7, 3 * a.steps_per_epoch + 5):  # The last is in epoch 4.
    _same_batch(a.train[i], b.train[i])
  # A "resumed" run (rebuilt from the caches of a) sees the same batch i.
  resumed = load_datasets(text_config, workdir=tmp_path / "a", batch_size=B)
  _same_batch(resumed.train[123], a.train[123])


def test_epochs_are_permutations_and_reshuffled(text_config, tmp_path):
  cfg = small_config(text_config.source, seq_len=256)  # Few windows: a short test.
  ds = load_datasets(cfg, workdir=tmp_path / "w", batch_size=B)
  n = ds.train_sequences
  tokens = np.load(next((tmp_path / "w/data/packed").glob("*/train_tokens_00000.npy")))
  assert tokens.shape == (n, 257)
  ids = _window_ids(ds, tokens, -(-2 * n // B))
  epoch1, epoch2 = ids[:n], ids[n:2 * n]
  assert sorted(epoch1) == sorted(epoch2) == list(range(n))
  assert epoch1 != epoch2 and epoch1 != list(range(n))
  other = load_datasets(dataclasses.replace(cfg, seed=1), workdir=tmp_path / "w",
                        batch_size=B)
  assert _window_ids(other, tokens, n // B) != epoch1[:n // B * B]


def test_eval_batches_are_fixed_spread_held_out_windows(text_config, tmp_path):
  ds = load_datasets(text_config, workdir=tmp_path / "w", batch_size=B)
  assert len(ds.eval_batches) == text_config.eval_batches == 2
  assert all(b["inputs"].shape == (B, 32) for b in ds.eval_batches)
  held = np.load(next((tmp_path / "w/data/packed").glob("*/validation_tokens_00000.npy")))
  assert len(held) == ds.eval_sequences
  index = {r.tobytes(): i for i, r in enumerate(held)}
  rows = [[index[np.append(i, t[-1]).astype(np.int32).tobytes()]
           for i, t in zip(b["inputs"], b["targets"])] for b in ds.eval_batches]
  # Distinct windows, in order within a batch, each batch spanning the split:
  # batch j holds every 2nd of the evenly spaced rows, starting at the j-th.
  flat = sorted(r for batch in rows for r in batch)
  assert len(set(flat)) == len(flat) and flat[-1] >= ds.eval_sequences // 2
  assert rows[0] == flat[0::2] and rows[1] == flat[1::2]
  assert rows[0][-1] >= ds.eval_sequences // 2  # The first batch reaches the end.
  # A batch larger than the held-out split: one batch of every held-out window.
  assert ds.train_sequences > ds.eval_sequences
  big = load_datasets(text_config, workdir=tmp_path / "w",
                      batch_size=ds.eval_sequences + 1)
  assert len(big.eval_batches) == 1
  assert big.eval_batches[0]["inputs"].shape == (ds.eval_sequences, 32)


def test_counts_and_describe(text_config, tmp_path):
  ds = load_datasets(text_config, workdir=tmp_path / "w", batch_size=B)
  assert ds.train_tokens == ds.train_sequences * 33
  assert ds.vocab_size == 400 and ds.domain_names == ("json", "prose", "wrap")
  line = ds.describe()
  assert "\n" not in line
  for part in ("3 domains (json, prose, wrap)", "vocab 400", "L=32",
               f"train {ds.train_sequences:,} sequences", "eval 2 batches of 4"):
    assert part in line


def test_tfds_source_reads_a_prepared_dataset(text_config, tmp_path):
  text = load_datasets(text_config, workdir=tmp_path / "a", batch_size=B)
  # The same carve, written by hand as a TFDS dataset (train and validation).
  files = sources.text_files(text_config.source[5:].split(","))
  splits = docs_lib.carve_splits(sources.read_text_files(files, None),
                                 text_config.eval_fraction, 0.0)
  data_dir = tmp_path / "tfds"
  text_builder.prepare(lambda: splits, data_dir)
  cfg = dataclasses.replace(text_config, source="tfds:moejax_text",
                            tfds_data_dir=str(data_dir))
  ds = load_datasets(cfg, workdir=tmp_path / "b", batch_size=B)
  # Same documents, same splits, same tokenizer: the very same batches.
  assert ds.domain_names == text.domain_names
  assert ds.eval_sequences == text.eval_sequences
  for i in (0, 9):
    _same_batch(ds.train[i], text.train[i])


class MoejaxTestNotes(tfds.core.GeneratorBasedBuilder):
  """A train-only dataset whose text feature is not called `text`."""
  VERSION = tfds.core.Version("1.0.0")
  code_path = None  # No checksums to look up.

  def __init__(self, **kwargs):
    super().__init__(file_format="array_record", **kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "label": tfds.features.ClassLabel(num_classes=3),
        "body": tfds.features.Text()}), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, (_, text) in enumerate(sorted(stdlib_texts().items())):
      yield i, {"label": i, "body": text}


def test_tfds_source_picks_text_feature_and_carves(tmp_path):
  MoejaxTestNotes(data_dir=str(tmp_path / "tfds")).download_and_prepare()
  cfg = small_config("tfds:moejax_test_notes", tfds_data_dir=str(tmp_path / "tfds"))
  ds = load_datasets(cfg, workdir=tmp_path / "w", batch_size=B)
  assert ds.domain_names == ("moejax_test_notes",)
  # The held-out windows come from chunks carved out of the train split.
  docs = [Document(t, "moejax_test_notes") for _, t in sorted(stdlib_texts().items())]
  _, valid = docs_lib.carve(docs, cfg.eval_fraction)
  held = [t for d in valid for t in ds.tokenizer.encode(d.text) + [3]]
  assert ds.eval_batches[0]["inputs"][0].tolist() == held[:32]


def test_tfds_errors(tmp_path):
  with pytest.raises(DataError, match="TFDS dataset 'no_such_dataset_x' not found"):
    load_datasets(small_config("tfds:no_such_dataset_x",
                               tfds_data_dir=str(tmp_path)),
                  workdir=tmp_path / "w", batch_size=B)
  features = tfds.features.FeaturesDict({"label": tfds.features.ClassLabel(
      num_classes=2)})
  with pytest.raises(DataError, match="has no text feature .features: label."):
    tfds_source.text_feature(features, "labels_only")


def test_text_builder_reads_back_by_name(tmp_path):
  docs = ([Document("train text\n", "a")], [Document("held out\n", "b")])
  text_builder.prepare(lambda: docs, tmp_path)
  got = tfds.data_source("moejax_text", split="validation", data_dir=str(tmp_path))
  assert [(r["text"], r["domain"]) for r in got] == [(b"held out\n", b"b")]


def _rot13(text: str) -> str:
  """The same bytes per line (ASCII letters rotated), different text."""
  import codecs  # pylint: disable=g-import-not-at-top
  return codecs.encode(text, "rot13")


def test_test_split_is_never_seen_by_training_or_validation(tmp_path):
  """Two corpora that differ only in the text carved out as test give the same
  tokenizer, training batches and validation batches; only the test batches
  differ."""
  fractions = {"eval_fraction": 0.25, "test_fraction": 0.25}
  folders = {}
  for variant in ("a", "b"):
    folder = folders[variant] = tmp_path / variant
    folder.mkdir()
    for stem, text in stdlib_texts().items():
      chunks = docs_lib.carve_chunks([Document(text, stem)], **fractions)
      test = {c.index for c in chunks.test}
      assert test, stem
      pieces = sorted(chunks.train + chunks.validation + chunks.test,
                      key=lambda c: c.index)
      (folder / f"{stem}.txt").write_text("".join(
          _rot13(c.text) if variant == "b" and c.index in test else c.text
          for c in pieces))
  ds = {v: load_datasets(small_config(f"text:{f}/*.txt", **fractions),
                         workdir=tmp_path / f"w{v}", batch_size=B)
        for v, f in folders.items()}
  a, b = ds["a"], ds["b"]
  assert ((tmp_path / "wa/tokenizer.model").read_bytes()
          == (tmp_path / "wb/tokenizer.model").read_bytes())
  for i in range(a.steps_per_epoch):  # One whole epoch of training batches.
    _same_batch(a.train[i], b.train[i])
  for x, y in zip(a.eval_batches, b.eval_batches, strict=True):
    _same_batch(x, y)
  assert a.test_sequences > 0 and b.test_sequences > 0 and a.test_batches
  # Rotated letters tokenize into other (more) pieces: other test windows.
  assert not np.array_equal(a.test_batches[0]["inputs"], b.test_batches[0]["inputs"])
  # Without a test share there are no test batches.
  plain = load_datasets(small_config(f"text:{folders['a']}/*.txt",
                                     eval_fraction=0.25),
                        workdir=tmp_path / "plain", batch_size=B)
  assert plain.test_batches == () and plain.test_sequences == 0


def test_train_rows_place_the_batch_each_process_holds(text_config, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from moejax.data.rows import place_rows, process_rows  # pylint: disable=g-import-not-at-top
  from moejax.parallel import (MeshConfig, batch_sharding, make_mesh,  # pylint: disable=g-import-not-at-top
                               shard_batch)
  ds = load_datasets(text_config, workdir=tmp_path / "w", batch_size=8)
  for i in (0, 7, ds.steps_per_epoch + 1):  # Across an epoch boundary too.
    whole = ds.train[i]
    rows = np.array([1, 4, 6])
    part = ds.train_rows(i, rows)
    for k in whole:
      np.testing.assert_array_equal(part[k], whole[k][rows])
  mesh = make_mesh(MeshConfig(data=2, expert=4), num_experts=4)
  sharding = batch_sharding(mesh)
  assert process_rows(8, sharding).tolist() == list(range(8))  # One process.
  placed = place_rows(lambda r: ds.train_rows(3, r), 8, sharding)
  want = shard_batch(ds.train[3], mesh)
  for k in want:
    assert placed[k].sharding == want[k].sharding
    np.testing.assert_array_equal(jax.device_get(placed[k]), ds.train[3][k])
