"""Packed seq2seq rows: (source, target) pairs -> fixed rows with segment ids.

Shapes: B batch (rows), L length: of a row's source side (`data.seq_len`) or
target side (`data.target_len`) or of a whole stored row (their sum).

Example k of a row (k = 1, 2, ...) holds on the encoder side its source ids then
EOS, and on the decoder side its target ids then EOS as labels, BOS then its
target ids as inputs: the LM convention (EOS ends every text, no BOS in the
text; the decoder starts from BOS). Its segment id is k on both sides (0 is
padding, whose tokens are PAD_ID = 0); positions restart at 0 in each example
(0 on padding). Pairs fill rows in corpus order, greedily: a pair that does not
fit what is left of the row on either side starts the next row, so no row
splits an example. A pair longer than its row (source + EOS over
`data.seq_len`, or target + EOS over `data.target_len`) is an error naming its files, line and lengths (`data.overlong=error`)
or is cut to fit, EOS kept (`truncate`).

A batch (`row_batch`), int32 unless said; encoder arrays are [B, L] with L =
`data.seq_len`, decoder arrays [B, L] with L = `data.target_len`:
  encoder_input_tokens, encoder_segment_ids, encoder_positions
  decoder_input_tokens, decoder_target_tokens, decoder_segment_ids,
  decoder_positions
  decoder_loss_weights  float32: 1 at every target token (EOS too), 0 at padding
Attention masks follow from the segment ids: encoder self-attention and
cross-attention where the segment ids are equal and non-zero, decoder
self-attention the same and causal.

Rows are written to the shards of `moejax.data.shards` as windows of both
sides' width:
tokens `[source | labels]`, and in the "domains" array the segment ids
`[source | target]`; positions and decoder inputs follow from them when read.
Preparation streams the pairs (`ENCODE_PAIRS` at a time per SentencePiece call)
and writes rows as they fill: memory does not grow with the corpus.
"""

import hashlib
import os
from collections.abc import Iterable, Iterator

import numpy as np
from etils import epath

from moejax.data import packing
from moejax.data.parallel import ParallelCorpus, Pair
from moejax.data.shards import SPLITS, Packed, ShardWriter, Windows
from moejax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from moejax.errors import DataError
from moejax.paths import as_path

FORMAT = "seq2seq-v1"
ENCODE_PAIRS = 4096  # Pairs per SentencePiece call.
OVERLONG = ("error", "truncate")
KEYS = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions",
        "decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids",
        "decoder_positions", "decoder_loss_weights")


class RowPacker:
  """Packs examples (source ids, target ids) into rows of both sides, greedily,
  in order: `add` returns the rows it closed, `close` the last one."""

  def __init__(self, source_len: int, target_len: int):
    self.S, self.T = source_len, target_len  # pylint: disable=invalid-name
    self._new()

  def _new(self):
    self._tokens = np.zeros(self.S + self.T, np.int32)
    self._segments = np.zeros(self.S + self.T, np.int32)
    self._s = self._t = self._k = 0

  def _row(self) -> tuple[np.ndarray, np.ndarray]:
    row = self._tokens, self._segments
    self._new()
    return row

  def add(self, source_ids: list[int], target_ids: list[int]
          ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Adds one example (ids without EOS; each fits its row with it)."""
    ns, nt = len(source_ids) + 1, len(target_ids) + 1
    out = []
    if self._k and (self._s + ns > self.S or self._t + nt > self.T):
      out.append(self._row())
    self._k += 1
    S, s, t = self.S, self._s, self._t  # pylint: disable=invalid-name
    self._tokens[s:s + ns] = source_ids + [EOS_ID]
    self._segments[s:s + ns] = self._k
    self._tokens[S + t:S + t + nt] = target_ids + [EOS_ID]
    self._segments[S + t:S + t + nt] = self._k
    self._s, self._t = s + ns, t + nt
    return out

  def close(self) -> list[tuple[np.ndarray, np.ndarray]]:
    return [self._row()] if self._k else []


def positions(segments_BL: np.ndarray) -> np.ndarray:
  """Position of each token in its example (segments contiguous), 0 on padding."""
  segments_BL = np.asarray(segments_BL)
  idx_BL = np.broadcast_to(np.arange(segments_BL.shape[-1]), segments_BL.shape)
  new_BL = np.ones(segments_BL.shape, bool)
  new_BL[..., 1:] = segments_BL[..., 1:] != segments_BL[..., :-1]
  start_BL = np.maximum.accumulate(np.where(new_BL, idx_BL, 0), axis=-1)
  return np.where(segments_BL > 0, idx_BL - start_BL, 0).astype(np.int32)


def row_batch(tokens_BL: np.ndarray, segments_BL: np.ndarray, source_len: int
              ) -> dict[str, np.ndarray]:
  """The batch dict (module docstring) of packed rows [..., L] (both sides)."""
  S = source_len  # pylint: disable=invalid-name
  tokens_BL = np.asarray(tokens_BL, np.int32)
  segments_BL = np.asarray(segments_BL, np.int32)
  enc_seg, dec_seg = segments_BL[..., :S], segments_BL[..., S:]
  labels = tokens_BL[..., S:]
  dec_pos = positions(dec_seg)
  shifted = np.zeros_like(labels)
  shifted[..., 1:] = labels[..., :-1]
  dec_in = np.where(dec_seg == 0, PAD_ID, np.where(dec_pos == 0, BOS_ID, shifted))
  return {"encoder_input_tokens": tokens_BL[..., :S],
          "encoder_segment_ids": enc_seg,
          "encoder_positions": positions(enc_seg),
          "decoder_input_tokens": dec_in.astype(np.int32),
          "decoder_target_tokens": labels,
          "decoder_segment_ids": dec_seg,
          "decoder_positions": dec_pos,
          "decoder_loss_weights": (dec_seg > 0).astype(np.float32)}


def fit(corpus: ParallelCorpus, pair: Pair, source_ids: list[int],
        target_ids: list[int], source_len: int, target_len: int, overlong: str
        ) -> tuple[list[int], list[int], bool]:
  """(source ids, target ids, cut) that fit the rows (each + EOS), or a DataError
  for a pair too long with `overlong="error"`."""
  ns, nt = len(source_ids) + 1, len(target_ids) + 1
  if ns <= source_len and nt <= target_len:
    return source_ids, target_ids, False
  if overlong == "error":
    raise DataError(
        f"the pair at {corpus.where(pair)} is longer than a row: source "
        f"{ns} tokens (data.seq_len={source_len}), target {nt} tokens "
        f"(data.target_len={target_len}), EOS included; raise the lengths, or set "
        "data.overlong=truncate")
  return source_ids[:source_len - 1], target_ids[:target_len - 1], True


def _encoded(sp, pairs: Iterable[Pair]) -> Iterator[tuple[Pair, list, list]]:
  """(pair, source ids, target ids) of each pair, encoded in groups."""
  threads = min(8, os.cpu_count() or 1)
  group: list[Pair] = []

  def flush():
    src = sp.encode([p.source for p in group], num_threads=threads)
    tgt = sp.encode([p.target for p in group], num_threads=threads)
    return zip(group, src, tgt)

  for pair in pairs:
    group.append(pair)
    if len(group) >= ENCODE_PAIRS:
      yield from flush()
      group = []
  if group:
    yield from flush()


def _pack_into(folder: epath.Path, corpus: ParallelCorpus, sp, source_len: int,
               target_len: int, overlong: str) -> dict:
  """Writes every split's rows into `folder`; the marker's content."""
  width = source_len + target_len
  writers = {split: ShardWriter(folder, split, width - 1, sp.vocab_size(),
                                count_tokens=split == "train",
                                shard_tokens=packing.SHARD_TOKENS)
             for split in SPLITS}
  packers = {split: RowPacker(source_len, target_len) for split in SPLITS}
  pairs = dict.fromkeys(SPLITS, 0)
  cut = 0

  def write(split, rows):
    if rows:
      writers[split].add(np.concatenate([r[0] for r in rows]),
                         np.concatenate([r[1] for r in rows]))

  for pair, src, tgt in _encoded(sp, corpus.pairs()):
    src, tgt, was_cut = fit(corpus, pair, src, tgt, source_len, target_len,
                            overlong)
    cut += was_cut
    pairs[pair.split] += 1
    write(pair.split, packers[pair.split].add(src, tgt))
  for split in SPLITS:
    write(split, packers[split].close())
    writers[split].close()
  counts = writers["train"].counts
  counts[PAD_ID] = 0  # Padding is not text.
  return {"format": FORMAT, "seq_len": width - 1, "source_len": source_len,
          "target_len": target_len,
          "shards": {split: w.shard_rows for split, w in writers.items()},
          "domains": ["source", "target"], "token_counts": counts.tolist(),
          "pairs": pairs, "truncated": cut}


def load_or_pack_pairs(corpus: ParallelCorpus, sp, source_len: int,
                       target_len: int, *, overlong: str,
                       cache_root: str | os.PathLike) -> Packed:
  """Packs every split's pairs into rows, cached on disk like LM windows
  (`<cache>/packed/<key>/`, key: format, corpus, tokenizer, both lengths,
  overlong)."""
  key = hashlib.sha256(
      f"{FORMAT}/{corpus.key}/{packing.tokenizer_hash(sp)}/{source_len}/"
      f"{target_len}/{overlong}".encode()).hexdigest()[:16]
  return packing.prepared(
      as_path(cache_root) / "packed" / key,
      lambda tmp: _pack_into(tmp, corpus, sp, source_len, target_len, overlong),
      corpus.check, "packed seq2seq rows")


class PackedRows:
  """Random access to packed seq2seq rows as dicts of arrays (a grain source)."""

  def __init__(self, windows: Windows, source_len: int):
    self._windows, self._source_len = windows, source_len

  def __len__(self) -> int:
    return len(self._windows)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    return row_batch(*self._windows.rows(i), self._source_len)
