"""Packing: documents -> an EOS-joined token stream -> windows of L+1 tokens + domains.

Shapes: T tokens in a stream, N windows, L = seq_len, B batch.
Every document is encoded, followed by EOS, and the documents are concatenated in
order; the stream is cut into N = T // (L+1) non-overlapping windows (the tail is
dropped). A window gives `inputs = w[:-1]` and `targets = w[1:]`; `domains` is the
domain id of each input token (an EOS belongs to the document it ends).

The packed arrays are cached under `<cache>/packed/<key>/` (key: corpus key,
tokenizer hash, L): `{train,validation,test}_{tokens,domains}.npy` int32[N, L+1] (test: N = 0
without a test split) and `domains.json` (the domain names, index = id),
written last: a directory with it is complete. Local caches are memory-mapped;
others are read whole.
"""

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np
from etils import epath

from moejax.data.documents import Document
from moejax.data.tokenizer import EOS_ID
from moejax.paths import as_path, is_local

SPLITS = ("train", "validation", "test")
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
  """Cuts a stream into windows: (tokens int32[N, L+1], domains int32[N, L+1])."""
  n = len(tokens_T) // (seq_len + 1)
  size = n * (seq_len + 1)
  return (tokens_T[:size].reshape(n, seq_len + 1),
          domains_T[:size].reshape(n, seq_len + 1))


@dataclasses.dataclass(frozen=True, eq=False)
class Packed:
  """Packed windows of every split, int32[N, L+1] each, and the domain names."""
  train_tokens: np.ndarray
  train_domains: np.ndarray
  validation_tokens: np.ndarray
  validation_domains: np.ndarray
  test_tokens: np.ndarray
  test_domains: np.ndarray
  domain_names: tuple[str, ...]
  cache_dir: str


def tokenizer_hash(sp) -> str:
  """A short hash of the serialized SentencePiece model."""
  return hashlib.sha256(sp.serialized_model_proto()).hexdigest()[:16]


def _load_array(path: epath.Path) -> np.ndarray:
  if is_local(path):
    return np.load(path, mmap_mode="r")
  with path.open("rb") as f:
    return np.load(f)


def _load(cache: epath.Path) -> Packed:
  arrays = {f"{s}_{k}": _load_array(cache / f"{s}_{k}.npy")
            for s in SPLITS for k in ("tokens", "domains")
            if (cache / f"{s}_{k}.npy").exists()}  # Caches older than test: none.
  empty = np.zeros((0, arrays["train_tokens"].shape[1]), np.int32)
  arrays.setdefault("test_tokens", empty)
  arrays.setdefault("test_domains", empty)
  names = tuple(json.loads((cache / "domains.json").read_text()))
  return Packed(**arrays, domain_names=names, cache_dir=os.fspath(cache))


def _save(cache: epath.Path, arrays: dict[str, np.ndarray],
          names: Sequence[str]) -> None:
  """Writes a new cache dir (a temporary one renamed into place, where renames
  exist); an existing one (from a racing process) wins."""
  cache.parent.mkdir(parents=True, exist_ok=True)
  tmp = (cache.parent / f".{cache.name}.{os.getpid()}.tmp" if is_local(cache)
         else cache)  # Object stores: objects are written whole, marker last.
  tmp.mkdir(parents=True, exist_ok=True)
  for name, array in arrays.items():
    with (tmp / f"{name}.npy").open("wb") as f:
      np.save(f, array)
  (tmp / "domains.json").write_text(json.dumps(list(names)))
  if tmp == cache:
    return
  try:
    tmp.rename(cache)
  except OSError:
    tmp.rmtree()  # Only the temporary dir this call created.


def load_or_pack(train: Sequence[Document], validation: Sequence[Document], sp,
                 seq_len: int, *, corpus_key: str, cache_root: str | os.PathLike,
                 test: Sequence[Document] = ()) -> Packed:
  """Packs every split with one domain numbering (train first), cached on disk."""
  key = hashlib.sha256(
      f"{corpus_key}/{tokenizer_hash(sp)}/{seq_len}".encode()).hexdigest()[:16]
  cache = as_path(cache_root) / "packed" / key
  if (cache / "domains.json").exists():
    return _load(cache)
  domain_ids: dict[str, int] = {}
  arrays = {}
  for split, docs in zip(SPLITS, (train, validation, test)):
    tokens, domains = pack(*encode_documents(sp, docs, domain_ids), seq_len)
    arrays[f"{split}_tokens"], arrays[f"{split}_domains"] = tokens, domains
  _save(cache, arrays, list(domain_ids))
  return Packed(**arrays, domain_names=tuple(domain_ids), cache_dir=os.fspath(cache))


def window_batch(tokens_BxL1: np.ndarray, domains_BxL1: np.ndarray
                 ) -> dict[str, np.ndarray]:
  """A batch dict from windows: inputs/targets/domains int32[B, L]."""
  tokens_BxL1 = np.asarray(tokens_BxL1, np.int32)
  return {"inputs": tokens_BxL1[..., :-1], "targets": tokens_BxL1[..., 1:],
          "domains": np.asarray(domains_BxL1[..., :-1], np.int32)}


class PackedSequences(Sequence[dict]):
  """Random access to packed windows as dicts of int32[L] (a grain source)."""

  def __init__(self, tokens_NxL1: np.ndarray, domains_NxL1: np.ndarray):
    self._tokens, self._domains = tokens_NxL1, domains_NxL1

  def __len__(self) -> int:
    return len(self._tokens)

  def __getitem__(self, i) -> dict[str, np.ndarray]:
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    return window_batch(self._tokens[i], self._domains[i])
