"""Packing: documents -> an EOS-joined token stream -> windows of L+1 tokens + domains.

Shapes: T tokens (of a stream), B batch (rows: the windows cut from a stream or
a split), L length (`seq_len`).

Every document is encoded, followed by EOS, and the documents are concatenated in
order; the stream is cut into T // (L+1) non-overlapping windows (the tail is
dropped). A window gives `inputs = w[:-1]` and `targets = w[1:]`; `domains` is the
domain id of each input token (an EOS belongs to the document it ends).

`load_or_pack` streams: documents are encoded in groups of about `GROUP_CHARS`
characters (a document longer than `PIECE_CHARS` in pieces cut after a line end,
each piece after the first encoded without SentencePiece's dummy prefix, which
gives the tokens of the whole document), and windows are written to shards as
they fill, so memory does not grow with the corpus.

Cache layout (written and read by `moejax.data.shards`), `<cache>/packed/<key>/` (key: `FORMAT`, corpus key, tokenizer hash,
L): per split, shards `{split}_tokens_{k:05d}.npy` int32[n_k, L+1] and
`{split}_domains_{k:05d}.npy` uint8 (uint16 when a shard has ids >= 256) of the
same shape; `packed.json` (shard sizes, domain names, training token counts),
written last: a directory with it is complete. A preparation that fails or is
killed leaves only a temporary directory, removed by the next preparation.
Shards are .npy: fixed-shape windows memory-map and slice with numpy alone,
row i of a split is one seek, and each shard is written whole by `np.save`.
Local caches are memory-mapped; others are read whole.
"""

import errno
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from etils import epath

from moejax.data.documents import Document
from moejax.data.shards import MARKER, SPLITS, Packed, ShardWriter, Windows
from moejax.data.shards import load as _load
from moejax.data.tokenizer import EOS_ID
from moejax.errors import DataError
from moejax.paths import as_path, is_local

FORMAT = "packed-v2"  # Caches of other formats live under other keys.
PIECE_CHARS = 1 << 20  # Longer documents are encoded in pieces of about this.
GROUP_CHARS = 4 << 20  # Text per SentencePiece call.
SHARD_TOKENS = 1 << 23  # Tokens per shard (32 MiB of int32), rounded to windows.

_ENCODE_GROUP = 256  # Documents per SentencePiece call: bounds memory, uses threads.


def encode_documents(sp, docs: Sequence[Document], domain_ids: dict[str, int]
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32[T], domains int32[T]): the EOS-joined stream of `docs`.

  Unseen domains get the next id in `domain_ids` (updated in place).
  """
  tokens, domains = [], []
  for start in range(0, len(docs), _ENCODE_GROUP):
    group = [docs[i] for i in range(start, min(start + _ENCODE_GROUP, len(docs)))]
    ids = sp.encode([d.text for d in group], num_threads=min(8, os.cpu_count() or 1))
    for doc, piece_ids in zip(group, ids):
      dom = domain_ids.setdefault(doc.domain, len(domain_ids))
      tokens.append(np.asarray(piece_ids + [EOS_ID], np.int32))
      domains.append(np.full(len(piece_ids) + 1, dom, np.int32))
  if not tokens:
    return np.zeros(0, np.int32), np.zeros(0, np.int32)
  return np.concatenate(tokens), np.concatenate(domains)


def pack(tokens_T: np.ndarray, domains_T: np.ndarray, seq_len: int
         ) -> tuple[np.ndarray, np.ndarray]:
  """Cuts a stream into windows: (tokens int32[B, L+1], domains int32[B, L+1])."""
  n = len(tokens_T) // (seq_len + 1)
  size = n * (seq_len + 1)
  return (tokens_T[:size].reshape(n, seq_len + 1),
          domains_T[:size].reshape(n, seq_len + 1))


def continuation_model(sp):
  """`sp` without the dummy prefix: encodes text that continues a line end of a
  document as the whole document's encoding would."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(sp.serialized_model_proto())
  proto.normalizer_spec.add_dummy_prefix = False
  return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def pieces(text: str, size: int | None = None) -> list[str]:
  """`text` cut after the first line end at or past every `size` characters."""
  size = size or PIECE_CHARS
  out, start = [], 0
  while len(text) - start > size:
    cut = text.find("\n", start + size)
    if cut < 0:
      break
    out.append(text[start:cut + 1])
    start = cut + 1
  out.append(text[start:])
  return out


def _threads() -> int:
  return min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)


class Progress:
  """A one-line progress report on stderr: MB done, MB/s and ETA."""

  def __init__(self, total_bytes: int | None, label: str):
    self.total, self.label, self.done = total_bytes, label, 0
    self._start = self._last = time.monotonic()
    self._tty = sys.stderr.isatty()

  def add(self, nbytes: int) -> None:
    self.done += nbytes
    now = time.monotonic()
    if now - self._last >= (0.5 if self._tty else 30.0):
      self._last = now
      self._print(now, end="\r" if self._tty else "\n")

  def close(self) -> None:
    if self.done and time.monotonic() - self._start >= 1.0:
      self._print(time.monotonic(), end="\n")

  def _print(self, now: float, end: str) -> None:
    rate = self.done / max(now - self._start, 1e-9)
    total = f"/{self.total / 1e6:,.0f}" if self.total else ""
    eta = ""
    if self.total and rate > 0:
      left = max(self.total - self.done, 0) / rate
      eta = f", ETA {int(left // 60)}:{int(left % 60):02d}"
    print(f"{self.label}: {self.done / 1e6:,.0f}{total} MB, {rate / 1e6:.2f} MB/s"
          f"{eta}", end=end, file=sys.stderr, flush=True)


def _encode_groups(sp, items: Iterable[tuple[str, Document]],
                   domain_ids: dict[str, int], progress: Progress | None
                   ) -> Iterator[list[tuple[str, np.ndarray, np.ndarray]]]:
  """Per group of (split, document) items, in order: (split, tokens int32[T],
  domains uint16[T]) for each run of one split's documents, the EOS-joined stream
  of `encode_documents`, a bounded group at a time."""
  cont = None
  group: list[tuple[str, str, bool, bool, int]] = []  # split, text, first, last, id
  size = 0

  def flush():
    nonlocal cont
    ids: list = [None] * len(group)
    threads = _threads()
    for first in (True, False):
      idx = [i for i, g in enumerate(group) if g[2] == first]
      if not idx:
        continue
      if not first:
        cont = cont or continuation_model(sp)
      model = sp if first else cont
      for i, out in zip(idx, model.encode([group[i][1] for i in idx],
                                          num_threads=threads)):
        ids[i] = out
    runs, tokens, domains = [], [], []
    for k, ((split, text, _, last, dom), piece_ids) in enumerate(zip(group, ids)):
      if last:
        piece_ids.append(EOS_ID)
      tokens.append(np.asarray(piece_ids, np.int32))
      domains.append(np.full(len(piece_ids), dom, np.uint16))
      if progress is not None:
        progress.add(len(text.encode("utf-8")))
      if k + 1 == len(group) or group[k + 1][0] != split:
        runs.append((split, np.concatenate(tokens), np.concatenate(domains)))
        tokens, domains = [], []
    return runs

  for split, doc in items:
    dom = domain_ids.setdefault(doc.domain, len(domain_ids))
    if dom >= 1 << 16:
      raise DataError(f"the corpus has more than {1 << 16} domains; give text: "
                      "files fewer distinct stems")
    parts = pieces(doc.text)
    for j, part in enumerate(parts):
      group.append((split, part, j == 0, j == len(parts) - 1, dom))
      size += len(part)
    if size >= GROUP_CHARS:
      yield flush()
      group, size = [], 0
  if group:
    yield flush()


def tokenizer_hash(sp) -> str:
  """A short hash of the serialized SentencePiece model."""
  return hashlib.sha256(sp.serialized_model_proto()).hexdigest()[:16]


def _remove_stale(cache: epath.Path) -> None:
  """Removes temporary dirs of earlier preparations of `cache` (killed or failed:
  the caller holds the preparation lock, or is the only writer)."""
  if not is_local(cache):
    return
  for tmp in cache.parent.glob(f".{cache.name}.*.tmp"):
    tmp.rmtree(missing_ok=True)


def load_or_pack(train: Iterable[Document], validation: Iterable[Document], sp,
                 seq_len: int, *, corpus_key: str, cache_root: str | os.PathLike,
                 test: Iterable[Document] = (),
                 total_bytes: int | Callable[[], int | None] | None = None,
                 check: Callable[[], None] | None = None,
                 tagged: Callable[[], Iterable[tuple[str, Document]]] | None = None
                 ) -> Packed:
  """Packs every split with one domain numbering (train first), cached on disk.

  The documents are read once per split, streamed; or, with `tagged()` (every
  split's documents in one pass, as (split, document), where every domain
  appears in train before any other split), once in all. `total_bytes` (the
  text of all splits) gives the progress report its ETA; `check()`, called
  before the cache is marked complete, may raise (e.g. a corpus that changed
  meanwhile)."""
  key = hashlib.sha256(f"{FORMAT}/{corpus_key}/{tokenizer_hash(sp)}/{seq_len}"
                       .encode()).hexdigest()[:16]
  return prepared(
      as_path(cache_root) / "packed" / key,
      lambda tmp: _pack_into(tmp, (train, validation, test), sp, seq_len,
                             total_bytes, tagged),
      check, "packed windows")


def prepared(cache: epath.Path, fill: Callable[[epath.Path], dict],
             check: Callable[[], None] | None = None, what: str = "packed rows"
             ) -> Packed:
  """The cache directory `cache`, written by `fill(folder)` (which returns the
  marker's content) unless it is complete: in a temporary directory renamed into
  place, the marker last, nothing kept on failure."""
  if (cache / MARKER).exists():
    return _load(cache)
  cache.parent.mkdir(parents=True, exist_ok=True)
  _remove_stale(cache)
  tmp = (cache.parent / f".{cache.name}.{os.getpid()}.tmp" if is_local(cache)
         else cache)  # Object stores: objects are written whole, marker last.
  try:
    tmp.mkdir(parents=True, exist_ok=True)
    meta = fill(tmp)
    if check is not None:
      check()
    (tmp / MARKER).write_text(json.dumps(meta))
  except OSError as e:
    if tmp != cache:
      tmp.rmtree(missing_ok=True)
    if e.errno == errno.ENOSPC:
      raise DataError(f"no space left on the device while writing {what} "
                      f"under {cache.parent}; free space or set data.cache_dir to a "
                      "larger disk (nothing was kept)") from None
    raise
  except BaseException:
    if tmp != cache:
      tmp.rmtree(missing_ok=True)
    raise
  if tmp != cache:
    try:
      tmp.rename(cache)
    except OSError:
      tmp.rmtree()  # A racing process finished first: keep theirs.
  return _load(cache)


def _pack_into(folder: epath.Path, splits: Sequence[Iterable[Document]], sp,
               seq_len: int, total_bytes, tagged) -> dict:
  """Writes every split's shards into `folder`; the marker's content."""
  domain_ids: dict[str, int] = {}
  progress = Progress(total_bytes() if callable(total_bytes) else total_bytes,
                      "packing")
  writers = {split: ShardWriter(folder, split, seq_len, sp.vocab_size(),
                                count_tokens=split == "train",
                                shard_tokens=SHARD_TOKENS) for split in SPLITS}
  if tagged is None:  # One pass per split, train first.
    tagged = ((split, doc) for split, docs in zip(SPLITS, splits) for doc in docs)
  else:
    tagged = tagged()
  for runs in _encode_groups(sp, tagged, domain_ids, progress):
    for split, tokens_T, domains_T in runs:
      writers[split].add(tokens_T, domains_T)
  for writer in writers.values():
    writer.close()
  progress.close()
  return {"format": FORMAT, "seq_len": seq_len,
          "shards": {split: w.shard_rows for split, w in writers.items()},
          "domains": list(domain_ids),
          "token_counts": writers["train"].counts.tolist()}


def window_batch(tokens_BxL1: np.ndarray, domains_BxL1: np.ndarray
                 ) -> dict[str, np.ndarray]:
  """A batch dict from windows: inputs/targets/domains int32[B, L]."""
  tokens_BxL1 = np.asarray(tokens_BxL1, np.int32)
  return {"inputs": tokens_BxL1[..., :-1], "targets": tokens_BxL1[..., 1:],
          "domains": np.asarray(domains_BxL1[..., :-1], np.int32)}


class PackedSequences(Sequence[dict]):
  """Random access to packed windows as dicts of int32[L] (a grain source)."""

  def __init__(self, windows: Windows):
    self._windows = windows

  def __len__(self) -> int:
    return len(self._windows)

  def __getitem__(self, i) -> dict[str, np.ndarray]:
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    return window_batch(*self._windows.rows(i))
