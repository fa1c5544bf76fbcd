"""Streamed corpora: text read in bounded blocks, chunked and carved on the fly.

Memory is bounded by a block (`BLOCK_BYTES`) and a run of chunks, not by the corpus:
- `text_chunks` reads `text:` files in blocks cut after a line end and yields the
  chunks of `moejax.data.documents` (same text, numbering and byte caps as reading
  each file whole), checking UTF-8 and NUL bytes as it goes;
- `document_chunks` chunks documents that are already in memory (embedded, TFDS
  records, read lazily);
- `Carved` runs the chunk-stride carve over such a stream: a first pass counts each
  domain's chunks (what the rule needs to know), then each split is a re-iterable of
  the same documents `documents.carve_splits` gives, in the same order
  (`tagged()`: every split's documents in one pass).

Bad bytes (`data.bad_input`): `"error"` (the default) stops at the first NUL or
non-UTF-8 byte with one line naming the file and byte offset; `"skip"` drops every
line holding one and warns once per file with the first offset.
"""

import dataclasses
import os
import pathlib
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from moejax.data import documents as docs_lib
from moejax.data.documents import Chunk, Document
from moejax.errors import DataError

BLOCK_BYTES = 4 << 20  # Bytes read at a time from a text file.
BAD_INPUT = ("error", "skip")
# Line ends str.splitlines knows but bytes.splitlines does not (in UTF-8).
_EXOTIC_BREAKS = re.compile(rb"[\x0b\x0c\x1c-\x1e]|\xc2\x85|\xe2\x80[\xa8\xa9]")


def _bad_line(path, offset: int, line: bytes) -> str | None:
  """Why `line` (at byte `offset` of `path`) is not text, or None."""
  nul = line.find(b"\0")
  if nul >= 0:
    return f"NUL byte at offset {offset + nul}"
  try:
    line.decode("utf-8")
  except UnicodeDecodeError as e:
    return f"byte 0x{line[e.start]:02x} at offset {offset + e.start}"
  return None


def _check_block(path, offset: int, data: bytes, bad_input: str,
                 skipped: list) -> bytes:
  """`data` (bytes at `offset` of `path`) if it is UTF-8 text without NUL bytes;
  else a DataError (`error`) or `data` without its bad lines (`skip`)."""
  nul = data.find(b"\0")
  problem = None
  if nul >= 0:
    problem = (f"{path} is binary (NUL byte at offset {offset + nul}); give only "
               "UTF-8 text files in data.source")
  else:
    try:
      data.decode("utf-8")
      return data
    except UnicodeDecodeError as e:
      problem = (f"{path} is not UTF-8 (byte 0x{data[e.start]:02x} at offset "
                 f"{offset + e.start}); convert it to UTF-8 or leave it out of "
                 "data.source")
  if bad_input == "error":
    raise DataError(problem + " (or set data.bad_input=skip to drop such lines)")
  kept, at = [], offset
  for line in data.splitlines(keepends=True):
    why = _bad_line(path, at, line)
    if why is None:
      kept.append(line)
    else:
      skipped.append(why)
    at += len(line)
  return b"".join(kept)


def file_blocks(path: pathlib.Path, take: int, bad_input: str = "error"
                ) -> Iterator[bytes]:
  """The UTF-8 bytes `sources.read_text_files` keeps of the first `take` bytes of
  `path`, in blocks that each end after a line end (but the last), BOM removed."""
  size = path.stat().st_size
  complete = take >= size
  skipped: list[str] = []
  read, carry, first = 0, b"", True
  with open(path, "rb") as f:
    while True:
      data = f.read(min(BLOCK_BYTES, take - read)) if read < take else b""
      read += len(data)
      buf, start = carry + data, read - len(carry) - len(data)
      end = read >= take or not data
      if not end:
        cut = buf.rfind(b"\n")
        if cut < 0:  # One long line so far: read on.
          carry = buf
          continue
        keep, carry = buf[:cut + 1], buf[cut + 1:]
      elif complete or read == 0:
        keep = buf
      else:  # Cut by the byte budget: back to the last line end read.
        nul = buf.find(b"\0")
        cut = buf.rfind(b"\n")
        if cut >= 0 or not first:
          keep = buf[:cut + 1]
          if nul > cut:  # Today's check covers the whole budget.
            keep = buf[:nul + 1]
        else:  # One line, cut: whole characters only.
          try:
            keep = buf[:len(docs_lib.utf8_prefix(buf).encode("utf-8"))]
          except UnicodeDecodeError:
            keep = buf  # Reported (or its bad line skipped) below.
          if nul >= len(keep):
            keep = buf[:nul + 1]
      keep = _check_block(path, start, keep, bad_input, skipped)
      if first:
        keep = keep.removeprefix("\ufeff".encode("utf-8"))
        first = False
      if keep:
        yield keep
      if end:
        break
  if skipped:
    print(f"warning: skipped {len(skipped)} line(s) of {path} that are not UTF-8 "
          f"text (first: {skipped[0]}); data.bad_input=error makes this fatal",
          file=sys.stderr)


def _block_lines(block: bytes) -> list[bytes]:
  """The lines of `block` as str.splitlines cuts its text, in UTF-8."""
  if _EXOTIC_BREAKS.search(block) is None:
    return block.splitlines(keepends=True)
  return [line.encode("utf-8")
          for line in block.decode("utf-8").splitlines(keepends=True)]


def _line_ends(block: bytes) -> np.ndarray | None:
  """Offsets just past each line of `block` (its end for a last line without a
  line end), or None where lines end at more than "\n" (a slower path)."""
  if b"\r" in block or _EXOTIC_BREAKS.search(block) is not None:
    return None
  ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 10) + 1
  if not block.endswith(b"\n"):
    ends = np.append(ends, len(block))
  return ends


def _chunk_blocks(blocks: Iterable[bytes]) -> Iterator[str]:
  """`documents.chunk_text` of the text the blocks join to, block by block: a
  chunk closes at the first line end at or past `CHUNK_BYTES` bytes."""
  need = docs_lib.CHUNK_BYTES
  current, size = [], 0
  for block in blocks:
    ends = _line_ends(block)
    if ends is None:
      for line in _block_lines(block):
        current.append(line)
        size += len(line)
        if size >= need:
          yield b"".join(current).decode("utf-8")
          current, size = [], 0
      continue
    pos = 0
    while pos < len(block):
      k = np.searchsorted(ends, pos + need - size)
      if k == len(ends):  # The rest of the block does not close a chunk.
        current.append(block[pos:])
        size += len(block) - pos
        break
      end = int(ends[k])
      current.append(block[pos:end])
      yield b"".join(current).decode("utf-8")
      current, size, pos = [], 0, end
  if current:
    yield b"".join(current).decode("utf-8")


def _numbered(texts_by_doc: Iterable[tuple[str, Iterable[str]]]) -> Iterator[Chunk]:
  """Chunks numbered per domain; documents that are only whitespace skipped."""
  counts: dict[str, int] = {}
  doc = 0
  for domain, texts in texts_by_doc:
    pending, blank = [], True
    for text in texts:
      if blank:
        pending.append(text)
        if not text.strip():
          continue
        blank = False
        texts_now, pending = pending, []
      else:
        texts_now = [text]
      for t in texts_now:
        index = counts.get(domain, 0)
        counts[domain] = index + 1
        yield Chunk(t, domain, doc, index)
    if not blank:
      doc += 1


def text_chunks(files: Sequence[pathlib.Path], max_bytes: int | None,
                bad_input: str = "error") -> Iterator[Chunk]:
  """The chunks of `documents.carve_chunks(sources.read_text_files(files,
  max_bytes))`, in the same order, reading each file in blocks."""
  domains = list(dict.fromkeys(f.stem for f in files))
  sizes = {d: sum(f.stat().st_size for f in files if f.stem == d) for d in domains}
  budget = dict(zip(domains, docs_lib.share_bytes([sizes[d] for d in domains],
                                                  max_bytes)))

  def per_file():
    for f in files:
      size = f.stat().st_size
      take = min(size, budget[f.stem])
      yield f.stem, _chunk_blocks(file_blocks(f, take, bad_input))
      budget[f.stem] = budget[f.stem] - take if take >= size else 0  # Cut: done.
  return _numbered(per_file())


def document_chunks(docs: Iterable[Document]) -> Iterator[Chunk]:
  """The chunks of `documents.carve_chunks(docs)`, in the same order."""
  return _numbered((d.domain, docs_lib.chunk_text(d.text)) for d in docs
                   if d.text.strip())


def capped(docs: Iterable[Document], max_bytes: int | None) -> Iterator[Document]:
  """`documents.cap_documents`, lazily."""
  remaining = max_bytes
  for doc in docs:
    cut = False
    if remaining is not None:
      text = docs_lib.take_prefix(doc.text, remaining)
      cut = len(text) < len(doc.text)
      doc = doc._replace(text=text)
      remaining -= docs_lib.utf8_len(text)
    if doc.text.strip():
      yield doc
    if cut:
      break


def _stride(fraction: float) -> int:
  return max(2, round(1 / fraction))


def _held(r: int, n: int, stride: int) -> bool:
  """Whether item r of n is picked by `documents._every_stride`."""
  return r % stride == stride - 1 or (n < stride and n >= 2 and r == n - 1)


def split_of(index: int, n: int, eval_fraction: float,
             test_fraction: float) -> str:
  """The split chunk `index` of a domain with `n` chunks goes to (the rule of
  `documents.carve_chunks`, without the other chunks at hand)."""
  stride = _stride(eval_fraction)
  if _held(index, n, stride):
    return "validation"
  if test_fraction <= 0:
    return "train"
  n_valid = n // stride if n >= stride else int(n >= 2)
  r = index - ((index + 1) // stride if n >= stride else 0)
  return "test" if _held(r, n - n_valid, _stride(test_fraction)) else "train"


def held_out(n: int, eval_fraction: float, test_fraction: float) -> dict[str, int]:
  """Chunks of a domain with `n` chunks that go to validation and test."""
  stride = _stride(eval_fraction)
  n_valid = n // stride if n >= stride else int(n >= 2)
  rest = n - n_valid
  ts = _stride(test_fraction) if test_fraction > 0 else 0
  n_test = 0 if not ts else (rest // ts if rest >= ts else int(rest >= 2))
  return {"validation": n_valid, "test": n_test}


@dataclasses.dataclass
class Counts:
  """What the first pass learns: chunks and bytes per domain, in first-seen order."""
  chunks: dict[str, int]
  bytes: dict[str, int]

  @property
  def total_bytes(self) -> int:
    return sum(self.bytes.values())


def count(chunks: Iterable[Chunk]) -> Counts:
  out = Counts({}, {})
  for c in chunks:
    out.chunks[c.domain] = max(out.chunks.get(c.domain, 0), c.index + 1)
    out.bytes[c.domain] = out.bytes.get(c.domain, 0) + docs_lib.utf8_len(c.text)
  return out


class SplitDocuments(Iterable[Document]):
  """The documents of one split of a carved stream, re-read on each iteration."""

  def __init__(self, carved: "Carved", split: str):
    self._carved, self.split = carved, split

  def __iter__(self) -> Iterator[Document]:
    return self._carved.documents(self.split)


class Carved:
  """A chunk stream carved into train, validation and test documents, lazily.

  `chunks_fn()` yields the stream afresh each time; `check()` (optional) runs
  after the counting pass, with the counts, to reject corpora too small to carve.
  """

  def __init__(self, chunks_fn: Callable[[], Iterator[Chunk]], eval_fraction: float,
               test_fraction: float = 0.0,
               check: Callable[[Counts], None] | None = None):
    self._chunks_fn, self._check = chunks_fn, check
    self.eval_fraction, self.test_fraction = eval_fraction, test_fraction
    self._counts: Counts | None = None

  @property
  def counts(self) -> Counts:
    if self._counts is None:
      counts = count(self._chunks_fn())
      if self._check is not None:
        self._check(counts)
      self._counts = counts
    return self._counts

  @property
  def total_bytes(self) -> int:
    return self.counts.total_bytes

  def split(self, split: str) -> SplitDocuments:
    return SplitDocuments(self, split)

  def documents(self, split: str) -> Iterator[Document]:
    """`documents.carve_splits(...)` of the stream, for `split`: consecutive
    chunks of one document in the split joined back."""
    n = self.counts.chunks
    run: list[str] = []
    prev = None
    for c in self._chunks_fn():
      if split_of(c.index, n[c.domain], self.eval_fraction,
                  self.test_fraction) != split:
        continue
      if prev is not None and not (c.doc == prev.doc and c.index == prev.index + 1):
        yield Document("".join(run), prev.domain)
        run = []
      run.append(c.text)
      prev = c
    if prev is not None:
      yield Document("".join(run), prev.domain)


  def tagged(self) -> Iterator[tuple[str, Document]]:
    """Every split's documents in one pass: (split, document), each split's in
    its order. A document ends where the next chunk goes elsewhere, as chunks of
    a document are consecutive; a domain's chunk 0 is always train, so every
    domain shows up in train first."""
    n = self.counts.chunks
    run: list[str] = []
    prev, prev_split = None, None
    for c in self._chunks_fn():
      split = split_of(c.index, n[c.domain], self.eval_fraction, self.test_fraction)
      if prev is not None and (split != prev_split or c.doc != prev.doc):
        yield prev_split, Document("".join(run), prev.domain)
        run = []
      run.append(c.text)
      prev, prev_split = c, split
    if prev is not None:
      yield prev_split, Document("".join(run), prev.domain)


def file_stats(files: Sequence[pathlib.Path]) -> list[tuple[str, int, int]]:
  """(path, size, mtime_ns) of each file: what keys a text corpus."""
  return [(os.fspath(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
