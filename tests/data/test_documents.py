"""Byte caps, line-boundary chunks and the deterministic held-out carve."""

from moejax.data import documents as docs_lib
from moejax.data.documents import Document
from tests.data.corpora import stdlib_texts


def test_share_bytes_is_water_filling():
  # Budget 90 over sizes (100, 10, 50): the 10 fits whole (fair share 30), the rest
  # 80 splits 40/40 between the two larger sources.
  assert docs_lib.share_bytes([100, 10, 50], 90) == [40, 10, 40]
  assert docs_lib.share_bytes([100, 10, 50], None) == [100, 10, 50]
  assert docs_lib.share_bytes([5, 7], 1000) == [5, 7]


def test_take_prefix_cuts_at_a_line_end_within_budget():
  text = "alpha\nbéta\ngamma\n"  # Lines of 6, 6 (é is 2 bytes) and 6 bytes.
  assert docs_lib.take_prefix(text, 13) == "alpha\nbéta\n"
  assert docs_lib.take_prefix(text, 100) == text
  # A single long line keeps whole characters only.
  assert docs_lib.take_prefix("ééé", 5) == "éé"


def test_cap_documents_respects_max_bytes():
  docs = [Document(t, d) for d, t in stdlib_texts().items()]
  capped = docs_lib.cap_documents(docs, 15_000)
  assert sum(docs_lib.utf8_len(d.text) for d in capped) <= 15_000
  # prose (~12 KB) fits whole; wrap is cut at a line end; json gets nothing.
  assert [d.domain for d in capped] == ["prose", "wrap"]
  assert capped[0] == docs[0]
  assert docs[1].text.startswith(capped[1].text) and capped[1].text.endswith("\n")


def test_chunks_rejoin_and_close_at_line_ends():
  text = stdlib_texts()["wrap"]
  chunks = docs_lib.chunk_text(text)
  assert "".join(chunks) == text
  longest_line = max(docs_lib.utf8_len(l) for l in text.splitlines(keepends=True))
  for c in chunks[:-1]:
    assert c.endswith("\n")
    assert 2048 <= docs_lib.utf8_len(c) < 2048 + longest_line
  assert len(chunks) >= 5


def test_carve_is_a_deterministic_partition_by_stride():
  docs = [Document(t, d) for d, t in stdlib_texts().items()]
  train, valid, test = docs_lib.carve_chunks(docs, 0.25)  # stride 4
  assert (train, valid, test) == docs_lib.carve_chunks(docs, 0.25)
  assert test == []  # No test share asked.
  ids = lambda cs: {(c.domain, c.index) for c in cs}
  assert not ids(train) & ids(valid)
  everything = {(d.domain, i) for d in docs
                for i in range(len(docs_lib.chunk_text(d.text)))}
  assert ids(train) | ids(valid) == everything
  assert {c.index % 4 for c in valid} == {3}
  assert {c.domain for c in valid} == {"prose", "wrap", "json"}
  # Each document is its train and validation chunks, interleaved in index order.
  for d, doc in enumerate(docs):
    pieces = sorted((c for c in train + valid if c.doc == d), key=lambda c: c.index)
    assert "".join(c.text for c in pieces) == doc.text


def test_small_domain_holds_out_its_last_chunk():
  line = "x" * 99 + "\n"
  docs = [Document(line * 25, "two"), Document("short\n", "one")]  # 2 chunks, 1 chunk
  train, valid, _ = docs_lib.carve_chunks(docs, 0.05)  # stride 20 > 2 chunks
  assert [(c.domain, c.index) for c in valid] == [("two", 1)]
  assert [(c.domain, c.index) for c in train] == [("two", 0), ("one", 0)]


def test_carve_rejoins_consecutive_train_chunks():
  docs = [Document(stdlib_texts()["wrap"], "wrap")]
  train_chunks, valid_chunks, _ = docs_lib.carve_chunks(docs, 0.25)
  train, valid = docs_lib.carve(docs, 0.25)
  assert "".join(d.text for d in train) == "".join(c.text for c in train_chunks)
  assert len(valid) == len(valid_chunks)  # Held-out chunks are never adjacent.
  assert len(train) == len(valid) + ((len(train_chunks) + len(valid)) % 4 != 0)


def test_test_split_is_carved_from_what_validation_leaves():
  docs = [Document(t, d) for d, t in stdlib_texts().items()]
  train, valid, test = docs_lib.carve_chunks(docs, 0.25, test_fraction=1 / 3)
  ids = lambda cs: {(c.domain, c.index) for c in cs}
  # Validation is exactly the split without a test share: asking for a test
  # split takes text from training only.
  no_test_train, no_test_valid, _ = docs_lib.carve_chunks(docs, 0.25)
  assert ids(valid) == ids(no_test_valid)
  assert ids(train) | ids(test) == ids(no_test_train)
  assert not ids(train) & ids(test)
  assert {c.domain for c in test} == {"prose", "wrap", "json"}
  for domain in ("prose", "wrap", "json"):
    # Validation takes chunks 3, 7, ...; of the rest (0, 1, 2, 4, 5, 6, 8, ...)
    # test takes every third: 2, 6, 10, ...
    rest = sorted(c.index for c in train + test if c.domain == domain)
    held = [c.index for c in test if c.domain == domain]
    assert held == [i for r, i in enumerate(rest) if r % 3 == 2], domain
  splits = docs_lib.carve_splits(docs, 0.25, 1 / 3)
  assert "".join(d.text for d in splits.test) == "".join(c.text for c in test)
