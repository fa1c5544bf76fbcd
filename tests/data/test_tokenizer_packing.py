"""The SentencePiece tokenizer (ids, cache, errors) and packing into windows."""

import numpy as np
import pytest

from moejax.data import EOS_ID, PAD_ID, load_datasets, packing, tokenizer
from moejax.data.documents import Document
from moejax.errors import DataError
from tests.data.corpora import small_config, snapshot, stdlib_texts

L = 32


@pytest.fixture(scope="module")
def docs():
  return [Document(t, d) for d, t in stdlib_texts().items()]


@pytest.fixture(scope="module")
def sp(docs):
  return tokenizer.train_tokenizer(docs, 400, 5_000)


def test_special_ids_and_lossless_round_trip(sp):
  assert sp.vocab_size() == 400
  assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
  assert sp.id_to_piece(4) == "<0x00>" and sp.id_to_piece(259) == "<0xFF>"
  text = "def f(x):\n\treturn  x + 1  # naïve 中\n\n"
  assert sp.decode(sp.encode(text)) == text


def test_training_is_deterministic(docs, sp):
  again = tokenizer.train_tokenizer(docs, 400, 5_000)
  assert again.serialized_model_proto() == sp.serialized_model_proto()


def test_sample_lines_is_even_and_ordered(docs):
  lines = [l for d in docs for l in d.text.splitlines() if l.strip()]
  sample = tokenizer.sample_lines(docs, 100)
  assert len(sample) == 100 and sample[0] == lines[0]
  assert sample == [lines[i * len(lines) // 100] for i in range(100)]


def test_vocab_errors_name_the_fix(docs):
  with pytest.raises(DataError, match=r"lower data.vocab_size to <= \d+"):
    tokenizer.train_tokenizer(docs[:1], 8_000, 5_000)
  with pytest.raises(DataError, match=r"raise data.vocab_size to at least \d+"):
    tokenizer.train_tokenizer(docs, 100, 5_000)


def test_windows_are_the_eos_joined_stream(docs, sp):
  domain_ids = {}
  tokens_T, domains_T = packing.encode_documents(sp, docs, domain_ids)
  windows, win_domains = packing.pack(tokens_T, domains_T, L)
  # The stream, built independently: each document's ids, then EOS.
  stream = [t for d in docs for t in sp.encode(d.text) + [EOS_ID]]
  doms = [i for i, d in enumerate(docs) for _ in range(len(sp.encode(d.text)) + 1)]
  assert domain_ids == {"prose": 0, "wrap": 1, "json": 2}
  assert windows.shape == (len(stream) // (L + 1), L + 1)
  assert windows.dtype == np.int32 and win_domains.dtype == np.int32
  np.testing.assert_array_equal(windows.ravel(), stream[:windows.size])
  np.testing.assert_array_equal(win_domains.ravel(), doms[:windows.size])
  assert PAD_ID not in windows


def test_batch_dict_shifts_targets(docs, sp):
  windows, win_domains = packing.pack(
      *packing.encode_documents(sp, docs, {}), L)
  batch = packing.window_batch(windows[:4], win_domains[:4])
  assert {k: v.shape for k, v in batch.items()} == {
      "inputs": (4, L), "targets": (4, L), "domains": (4, L)}
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  np.testing.assert_array_equal(batch["targets"], windows[:4, 1:])
  np.testing.assert_array_equal(batch["domains"], win_domains[:4, :-1])


@pytest.mark.parametrize("small", [False, True], ids=["whole", "pieces"])
def test_streamed_windows_equal_the_in_memory_pack(docs, sp, tmp_path, monkeypatch,
                                                  small):
  if small:  # Documents in pieces, many encode groups, windows over many shards.
    monkeypatch.setattr(packing, "PIECE_CHARS", 700)
    monkeypatch.setattr(packing, "GROUP_CHARS", 3000)
    monkeypatch.setattr(packing, "SHARD_TOKENS", 40 * (L + 1) + 7)
  packed = packing.load_or_pack(docs[:2], docs[2:], sp, L, corpus_key="k",
                                cache_root=tmp_path)
  ids: dict[str, int] = {}
  for split, part in (("train", docs[:2]), ("validation", docs[2:])):
    want_tokens, want_domains = packing.pack(
        *packing.encode_documents(sp, part, ids), L)
    got = getattr(packed, split)
    np.testing.assert_array_equal(got.tokens(), want_tokens)
    np.testing.assert_array_equal(got.domains(), want_domains)
    if split == "train":
      np.testing.assert_array_equal(
          packed.token_counts, np.bincount(want_tokens.reshape(-1), minlength=400))
  assert packed.domain_names == tuple(ids) == ("prose", "wrap", "json")
  assert len(packed.test) == 0
  [cache] = (tmp_path / "packed").iterdir()
  shards = sorted(cache.glob("train_domains_*.npy"))
  assert (len(shards) > 2) == small
  assert all(np.load(f).dtype == np.uint8 for f in shards)  # 1 byte per token.


def test_packed_arrays_are_cached(docs, sp, tmp_path, monkeypatch):
  first = packing.load_or_pack(docs[:2], docs[2:], sp, L, corpus_key="k",
                               cache_root=tmp_path)
  assert len(list((tmp_path / "packed").iterdir())) == 1
  monkeypatch.setattr(packing, "_encode_groups", lambda *a: pytest.fail("re-encoded"))
  again = packing.load_or_pack(docs[:2], docs[2:], sp, L, corpus_key="k",
                               cache_root=tmp_path)
  np.testing.assert_array_equal(again.train_tokens, first.train_tokens)
  np.testing.assert_array_equal(again.validation.domains(),
                                first.validation.domains())
  assert again.domain_names == first.domain_names == ("prose", "wrap", "json")


def test_tokenizer_is_cached_and_reused(text_config, tmp_path, monkeypatch):
  workdir = tmp_path / "w"
  load_datasets(text_config, workdir=workdir, batch_size=4)
  model = workdir / "tokenizer.model"
  before = snapshot(workdir)["tokenizer.model"]
  monkeypatch.setattr(tokenizer, "train_tokenizer", lambda *a: pytest.fail("retrained"))
  ds = load_datasets(text_config, workdir=workdir, batch_size=8)
  assert snapshot(workdir)["tokenizer.model"] == before
  assert ds.tokenizer.serialized_model_proto() == model.read_bytes()


def test_vocab_mismatch_raises_and_keeps_the_file(text_config, tmp_path):
  workdir = tmp_path / "w"
  load_datasets(text_config, workdir=workdir, batch_size=4)
  before = snapshot(workdir)
  cfg = small_config(text_config.source, vocab_size=512)
  with pytest.raises(DataError, match=r"tokenizer.model has vocab size 400 but "
                     r"data.vocab_size is 512; set data.vocab_size=400"):
    load_datasets(cfg, workdir=workdir, batch_size=4)
  assert snapshot(workdir) == before
