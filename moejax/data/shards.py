"""The packed cache on disk: shards of windows, their writer and their reader.

Shapes: B batch (rows: the windows of a split), L length (`seq_len`), T tokens
(of a stream), V vocabulary.

Layout of one cache directory: per split, shards `{split}_tokens_{k:05d}.npy`
int32[n_k, L+1] and `{split}_domains_{k:05d}.npy` uint8 (uint16 when a shard has
ids >= 256) of the same shape, and `packed.json` (shard sizes, domain names,
training token counts), written last by `moejax.data.packing`. Local shards are
memory-mapped; others are read whole.
"""

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np
from etils import epath

from moejax.paths import is_local

MARKER = "packed.json"
SPLITS = ("train", "validation", "test")


class ShardWriter:
  """Appends a split's token stream and writes full windows to shards."""

  def __init__(self, folder: epath.Path, split: str, seq_len: int, vocab_size: int,
               count_tokens: bool, shard_tokens: int):
    self._folder, self._split, self._width = folder, split, seq_len + 1
    self._rows_per_shard = max(1, shard_tokens // self._width)
    self._tokens: list[np.ndarray] = []
    self._domains: list[np.ndarray] = []
    self._buffered = 0
    self.shard_rows: list[int] = []
    self.counts = np.zeros(vocab_size, np.int64) if count_tokens else None

  def add(self, tokens_T: np.ndarray, domains_T: np.ndarray) -> None:
    self._tokens.append(tokens_T)
    self._domains.append(domains_T)
    self._buffered += len(tokens_T)
    if self._buffered >= self._rows_per_shard * self._width:
      self._flush(final=False)

  def close(self) -> None:
    self._flush(final=True)

  def _flush(self, final: bool) -> None:
    if not self._tokens:
      return
    tokens, domains = np.concatenate(self._tokens), np.concatenate(self._domains)
    per = self._rows_per_shard * self._width
    while len(tokens) >= per or (final and len(tokens) >= self._width):
      rows = min(per, len(tokens)) // self._width
      size = rows * self._width
      self._write(tokens[:size].reshape(rows, self._width),
                  domains[:size].reshape(rows, self._width))
      tokens, domains = tokens[size:], domains[size:]
    self._tokens, self._domains, self._buffered = [tokens], [domains], len(tokens)

  def _write(self, tokens: np.ndarray, domains: np.ndarray) -> None:
    k = len(self.shard_rows)
    dtype = np.uint8 if domains.max(initial=0) < 256 else np.uint16
    for kind, array in (("tokens", tokens), ("domains", domains.astype(dtype))):
      with (self._folder / f"{self._split}_{kind}_{k:05d}.npy").open("wb") as f:
        np.save(f, array)
    if self.counts is not None:
      self.counts += np.bincount(tokens.reshape(-1), minlength=len(self.counts))
    self.shard_rows.append(len(tokens))


class Windows:
  """A split's windows from its shards: rows by index, int32[L+1] each."""

  def __init__(self, tokens: Sequence[np.ndarray], domains: Sequence[np.ndarray],
               width: int):
    self._tokens, self._domains, self.width = list(tokens), list(domains), width
    self._starts = np.cumsum([0] + [len(t) for t in self._tokens])

  def __len__(self) -> int:
    return int(self._starts[-1])

  @property
  def shape(self) -> tuple[int, int]:
    return (len(self), self.width)

  @property
  def size(self) -> int:
    return len(self) * self.width

  def rows(self, idx) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32[..., L+1], domains int32[..., L+1]) of rows `idx` (an int or
    an int array)."""
    idx = np.asarray(idx, np.int64)
    if np.any((idx < 0) | (idx >= len(self))):
      raise IndexError(f"window index out of range [0, {len(self)})")
    flat = idx.reshape(-1)
    shard = np.searchsorted(self._starts, flat, side="right") - 1
    tokens = np.empty((len(flat), self.width), np.int32)
    domains = np.empty((len(flat), self.width), np.int32)
    for k in np.unique(shard):
      sel = shard == k
      local = flat[sel] - self._starts[k]
      tokens[sel] = self._tokens[k][local]
      domains[sel] = self._domains[k][local]
    return (tokens.reshape(idx.shape + (self.width,)),
            domains.reshape(idx.shape + (self.width,)))

  def tokens(self) -> np.ndarray:
    """Every window's tokens, int32[B, L+1] (in memory: for small splits)."""
    return self.rows(np.arange(len(self)))[0]

  def domains(self) -> np.ndarray:
    """Every window's domain ids, int32[B, L+1] (in memory: for small splits)."""
    return self.rows(np.arange(len(self)))[1]


@dataclasses.dataclass(frozen=True, eq=False)
class Packed:
  """Packed windows of every split, the domain names and the training tokens'
  counts (int64[V])."""
  train: Windows
  validation: Windows
  test: Windows
  domain_names: tuple[str, ...]
  token_counts: np.ndarray
  cache_dir: str

  @property
  def train_tokens(self) -> np.ndarray:
    return self.train.tokens()


def _load_array(path: epath.Path) -> np.ndarray:
  if is_local(path):
    return np.load(path, mmap_mode="r")
  with path.open("rb") as f:
    return np.load(f)


def load(cache: epath.Path) -> Packed:
  meta = json.loads((cache / MARKER).read_text())
  width = meta["seq_len"] + 1
  splits = {}
  for split in SPLITS:
    n = len(meta["shards"][split])
    splits[split] = Windows(
        [_load_array(cache / f"{split}_tokens_{k:05d}.npy") for k in range(n)],
        [_load_array(cache / f"{split}_domains_{k:05d}.npy") for k in range(n)],
        width)
  return Packed(**splits, domain_names=tuple(meta["domains"]),
                token_counts=np.asarray(meta["token_counts"], np.int64),
                cache_dir=os.fspath(cache))
