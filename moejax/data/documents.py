"""Documents: how raw text is capped to a byte budget and carved into train/validation.

A document is one file, one docs topic or one TFDS record, tagged with its domain.

The held-out carve is deterministic and needs no randomness:
- each document is cut into chunks at line boundaries: a chunk closes at the first
  line end at or past `CHUNK_BYTES` (2 KiB) of UTF-8, so most chunks are 2-4 KiB; a
  document's last chunk may be shorter, and a single longer line makes a longer chunk;
- chunks are numbered i = 0, 1, ... in order within each domain (across its documents);
  with `stride = round(1 / eval_fraction)`, chunk i goes to validation iff
  `i % stride == stride - 1` (the effective held-out share is 1/stride);
- a domain with two or more chunks but fewer than `stride` gets its last chunk held
  out, so every domain with two or more chunks has at least one validation chunk;
- with a test share (`test_fraction` > 0), the same rule runs again on each domain's
  chunks that validation left, numbered r = 0, 1, ... in order: chunk r goes to
  test iff `r % test_stride == test_stride - 1`, `test_stride = round(1 /
  test_fraction)` (a domain with two or more such chunks but fewer than the
  stride gives its last one); the test share is `(1 - 1/stride) / test_stride`
  of the corpus, and test text is disjoint from training and validation text;
- consecutive chunks of one document that land in the same split are joined again, so
  an example (and an EOS after packing) never breaks a document except where a
  held-out chunk was cut out of it.
"""

import codecs
from collections.abc import Iterable, Sequence
from typing import NamedTuple

CHUNK_BYTES = 2048


class Document(NamedTuple):
  """One unit of text and the name of its domain."""
  text: str
  domain: str


class Chunk(NamedTuple):
  """A piece of document number `doc`, numbered `index` within its domain."""
  text: str
  domain: str
  doc: int
  index: int


def utf8_len(text: str) -> int:
  """Bytes of `text` in UTF-8."""
  return len(text.encode("utf-8"))


def share_bytes(sizes: Sequence[int], total: int | None) -> list[int]:
  """Splits a byte budget across sources as evenly as their sizes allow (water-filling).

  Each source gets `min(size, fair share)`; what small sources leave is shared among
  the larger ones. `total=None` keeps every source whole.
  """
  if total is None:
    return list(sizes)
  alloc = [0] * len(sizes)
  remaining = total
  order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
  for k, i in enumerate(order):
    alloc[i] = min(sizes[i], remaining // (len(sizes) - k))
    remaining -= alloc[i]
  return alloc


def utf8_prefix(data: bytes) -> str:
  """Decodes the longest prefix of `data` that ends at a line end (or a whole char)."""
  cut = data.rfind(b"\n")
  if cut >= 0:
    return data[:cut + 1].decode("utf-8")
  # One long line: keep whole characters only.
  return codecs.getincrementaldecoder("utf-8")().decode(data, final=False)


def take_prefix(text: str, max_bytes: int) -> str:
  """The longest prefix of `text` within `max_bytes` bytes, cut at a line end if any."""
  data = text.encode("utf-8")
  if len(data) <= max_bytes:
    return text
  return utf8_prefix(data[:max_bytes])


def cap_documents(docs: Iterable[Document], max_bytes: int | None) -> list[Document]:
  """Documents in order until `max_bytes` bytes are taken; the last one is cut short."""
  out = []
  remaining = max_bytes
  for doc in docs:
    cut = False
    if remaining is not None:
      text = take_prefix(doc.text, remaining)
      cut = len(text) < len(doc.text)
      doc = doc._replace(text=text)
      remaining -= utf8_len(text)
    if doc.text.strip():
      out.append(doc)
    if cut:
      break
  return out


def chunk_text(text: str, chunk_bytes: int = CHUNK_BYTES) -> list[str]:
  """Cuts `text` at line ends into chunks of at least `chunk_bytes` (but the last)."""
  chunks, current, size = [], [], 0
  for line in text.splitlines(keepends=True):
    current.append(line)
    size += utf8_len(line)
    if size >= chunk_bytes:
      chunks.append("".join(current))
      current, size = [], 0
  if current:
    chunks.append("".join(current))
  return chunks


class Splits(NamedTuple):
  """Documents (or chunks) of each split; `test` is empty without a test share."""
  train: list
  validation: list
  test: list


def _every_stride(chunks: Sequence[Chunk], fraction: float) -> set[int]:
  """Indices of the chunks the stride rule holds out (see the module docstring)."""
  stride = max(2, round(1 / fraction))
  picked = [c.index for r, c in enumerate(chunks) if r % stride == stride - 1]
  if not picked and len(chunks) >= 2:
    picked = [chunks[-1].index]
  return set(picked)


def carve_chunks(docs: Sequence[Document], eval_fraction: float,
                 test_fraction: float = 0.0) -> Splits:
  """Assigns every chunk of `docs` to train, validation or test by the stride
  rules above."""
  by_domain: dict[str, list[Chunk]] = {}
  for d, doc in enumerate(docs):
    for text in chunk_text(doc.text):
      chunks = by_domain.setdefault(doc.domain, [])
      chunks.append(Chunk(text, doc.domain, d, len(chunks)))
  split_of: dict[tuple[str, int], str] = {}
  for domain, chunks in by_domain.items():
    valid = _every_stride(chunks, eval_fraction)
    split_of.update(((domain, i), "validation") for i in valid)
    if test_fraction > 0:
      rest = [c for c in chunks if c.index not in valid]
      split_of.update(((domain, i), "test")
                      for i in _every_stride(rest, test_fraction))
  ordered = sorted((c for cs in by_domain.values() for c in cs),
                   key=lambda c: (c.doc, c.index))
  return Splits(*([c for c in ordered
                   if split_of.get((c.domain, c.index), "train") == split]
                  for split in Splits._fields))


def join_runs(chunks: Sequence[Chunk]) -> list[Document]:
  """Joins chunks that are consecutive pieces of one document back into documents."""
  out: list[Document] = []
  prev = None
  for c in chunks:
    if prev is not None and c.doc == prev.doc and c.index == prev.index + 1:
      out[-1] = out[-1]._replace(text=out[-1].text + c.text)
    else:
      out.append(Document(c.text, c.domain))
    prev = c
  return out


def carve(docs: Sequence[Document], eval_fraction: float
          ) -> tuple[list[Document], list[Document]]:
  """(train, validation) documents of `docs`, carved by the chunk-stride rule."""
  train, valid, _ = carve_chunks(docs, eval_fraction)
  return join_runs(train), join_runs(valid)


def carve_splits(docs: Sequence[Document], eval_fraction: float,
                 test_fraction: float) -> Splits:
  """Train, validation and test documents of `docs` (test empty when
  `test_fraction` is 0), carved by the chunk-stride rules."""
  return Splits(*map(join_runs, carve_chunks(docs, eval_fraction, test_fraction)))
