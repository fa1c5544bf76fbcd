"""The data pipeline: `load_datasets(cfg, workdir=..., batch_size=...) -> Datasets`.

Shapes: B batch, L length (`cfg.seq_len`), V vocabulary.

By `data.task`, a batch is
- "lm": a dict of int32[B, L]: `inputs`, `targets` (inputs shifted by one:
  both come from one packed window of L+1 tokens) and `domains` (the domain id
  of each input token, an index into `domain_names`);
- "mlm": `inputs`, `targets`, `domains` int32[B, L] and `weights` float32[B, L]
  from the same windows, masked per step (`moejax.data.mlm`);
- "seq2seq": packed pairs of a `parallel:` source (`moejax.data.seq2seq`:
  `encoder_*` [B, L], `decoder_*` [B, `data.target_len`]).

Training batch i is `ds.train[i]`, a pure function of (corpus, tokenizer, seed, i):
sequences are shuffled per epoch (each epoch a new permutation of all of them) and
batches are cut from the endless shuffled stream, so a batch may span two epochs.
A trainer that stores only i in its checkpoints resumes exactly where it left off.

What is written (nothing existing is ever overwritten or deleted):
  <workdir>/tokenizer.model        SentencePiece model, reused whenever present
  <cache>/tokenizers/<key>.model   the tokenizer, kept for other workdirs
  <cache>/packed/<key>/...         packed window shards and `packed.json` (written
                                   last: `moejax.data.packing`)
Every source is streamed (`moejax.data.stream`): memory does not grow with the
corpus.
where <cache> is `data.cache_dir` (`moejax.data.cache`: by default the user cache
dir; `""` is `<workdir>/data`). In a multi-process run process 0 prepares and
writes the workdir; the others wait for it, then open what it built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import TYPE_CHECKING

import numpy as np

from moejax.data import cache as cache_lib
from moejax.data import packing, sources, tokenizer
from moejax.data.config import DataConfig
from moejax.errors import DataError
from moejax.paths import as_path

if TYPE_CHECKING:
  import grain
  import sentencepiece as spm

Batch = dict[str, np.ndarray]
# A window of L tokens gives its tokens at most L - 1 tokens of context: below
# 8 a language model (and its attention) has next to nothing to learn from.
MIN_SEQ_LEN = 8


@dataclasses.dataclass(frozen=True, eq=False)
class Datasets:
  """Training batches by index, fixed held-out batches, and what describes them."""
  train: grain.MapDataset  # ds.train[i]: batch i, endless.
  train_sequences_stream: grain.MapDataset  # Sequence j of the shuffled stream.
  eval_batches: tuple[Batch, ...]  # In order; each of min(B, eval_sequences) rows.
  test_batches: tuple[Batch, ...]  # The same from the test split; () without one.
  tokenizer: spm.SentencePieceProcessor
  vocab_size: int
  domain_names: tuple[str, ...]
  train_sequences: int  # Packed training windows (one epoch).
  eval_sequences: int  # Packed held-out windows (eval_batches use a spread subset).
  test_sequences: int  # Packed test windows (0 without a test split).
  train_tokens: int  # Tokens in the packed training windows: sequences * (L + 1).
  token_counts: np.ndarray  # int64[V]: occurrences of each id in the training split.
  seq_len: int
  batch_size: int
  source: str
  cache_dir: str
  task: str = "lm"  # `data.task`: what a batch holds (module docstring).
  target_len: int | None = None  # seq2seq: T, the decoder row length.
  mask_id: int | None = None  # mlm: the id of `<mask>`.

  def train_rows(self, i: int, rows) -> Batch:
    """Rows `rows` (sorted batch positions) of training batch i, read alone:
    equal to `ds.train[i][k][rows]` for every key k."""
    B = self.batch_size  # pylint: disable=invalid-name
    items = [self.train_sequences_stream[i * B + int(r)] for r in rows]
    return {k: np.stack([x[k] for x in items]) for k in items[0]}

  @property
  def steps_per_epoch(self) -> int:
    """Training batches per pass over all sequences (rounded down)."""
    return self.train_sequences // self.batch_size

  def describe(self) -> str:
    """One line for logs."""
    eval_b = len(next(iter(self.eval_batches[0].values())))
    task = {"lm": "", "mlm": f"masked LM (mask id {self.mask_id}), ",
            "seq2seq": f"seq2seq rows of {self.seq_len}+{self.target_len} "
                       "tokens, "}[self.task]
    return (f"data {self.source}: {task}{len(self.domain_names)} domains "
            f"({', '.join(self.domain_names)}), vocab {self.vocab_size}, "
            f"L={self.seq_len}; train {self.train_sequences:,} sequences "
            f"({self.train_tokens:,} tokens, {self.steps_per_epoch:,} batches of "
            f"{self.batch_size}/epoch); eval {len(self.eval_batches)} batches of "
            f"{eval_b} from {self.eval_sequences:,} held-out sequences; "
            + (f"test {len(self.test_batches)} batches from "
               f"{self.test_sequences:,} sequences; " if self.test_sequences else "")
            + f"cache {self.cache_dir}")


def _positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise DataError(f"{name} must be a positive integer, got {value!r}; fix it in "
                    "the config")


def validate(cfg: DataConfig) -> None:
  """Checks every field of `cfg` that can be checked without reading data."""
  sources.parse_source(cfg.source)
  for name in ("seq_len", "vocab_size", "eval_batches", "tokenizer_max_sentences"):
    _positive_int(f"data.{name}", getattr(cfg, name))
  if cfg.seq_len < MIN_SEQ_LEN and cfg.task != "seq2seq":
    raise DataError(
        f"data.seq_len={cfg.seq_len} is too short to train a language model: "
        f"each token would see at most {cfg.seq_len - 1} token(s) of context; "
        f"use data.seq_len >= {MIN_SEQ_LEN} (e.g. 128)")
  if cfg.vocab_size <= tokenizer.RESERVED_PIECES:
    raise DataError(
        f"data.vocab_size={cfg.vocab_size} leaves no room for text pieces beside the "
        f"{tokenizer.RESERVED_PIECES} special and byte pieces; use at least 384 "
        "(260 + the corpus's distinct characters)")
  if cfg.max_bytes is not None:
    _positive_int("data.max_bytes", cfg.max_bytes)
  if cfg.bad_input not in ("error", "skip"):
    raise DataError(f"data.bad_input must be 'error' or 'skip', got "
                    f"{cfg.bad_input!r}")
  tasks = ("lm", "mlm", "seq2seq")
  if cfg.task not in tasks:
    raise DataError(f"data.task must be one of {', '.join(tasks)}, got "
                    f"{cfg.task!r}")
  parallel = cfg.source.startswith("parallel:")
  seq2seq = cfg.task == "seq2seq"
  if (parallel and not seq2seq) or (
      seq2seq and not (parallel or cfg.source.startswith("tfds:"))):
    raise DataError(
        f"data.task={cfg.task} with data.source {cfg.source!r}: a parallel: "
        "source needs data.task=seq2seq, and data.task=seq2seq a parallel: or "
        "tfds: (translation) source")
  if cfg.target_len is not None:
    _positive_int("data.target_len", cfg.target_len)
  if cfg.task == "seq2seq" and min(cfg.seq_len, cfg.target_len or cfg.seq_len) < 2:
    raise DataError("data.seq_len and data.target_len must be at least 2 for "
                    "seq2seq (a token and EOS)")
  if cfg.overlong not in ("error", "truncate"):
    raise DataError(f"data.overlong must be 'error' or 'truncate', got "
                    f"{cfg.overlong!r}")
  if (isinstance(cfg.mlm_probability, bool)
      or not isinstance(cfg.mlm_probability, (int, float))
      or not 0 < cfg.mlm_probability < 1):
    raise DataError(f"data.mlm_probability must be in (0, 1), got "
                    f"{cfg.mlm_probability!r}; e.g. 0.15")
  if (isinstance(cfg.eval_fraction, bool)
      or not isinstance(cfg.eval_fraction, (int, float))
      or not 0 < cfg.eval_fraction <= 0.5):
    raise DataError(f"data.eval_fraction must be in (0, 0.5], got "
                    f"{cfg.eval_fraction!r}; e.g. data.eval_fraction=0.05")
  if (isinstance(cfg.test_fraction, bool)
      or not isinstance(cfg.test_fraction, (int, float))
      or not 0 <= cfg.test_fraction <= 0.5):
    raise DataError(f"data.test_fraction must be in [0, 0.5] (0: no test split), "
                    f"got {cfg.test_fraction!r}; e.g. data.test_fraction=0.05")


def make_eval_batches(windows: packing.Windows, batch_size: int,
                      max_batches: int, to_batch=None) -> tuple[Batch, ...]:
  """Up to `max_batches` fixed batches of min(batch_size, N) rows, spread over N.

  The rows are evenly spaced over the held-out windows, and batch j takes every
  `count`-th of them from the j-th, so each batch (the first is also the routing
  probe set) spans the whole held-out split and every domain in it.
  """
  n = len(windows)
  rows = min(batch_size, n)
  count = min(max_batches, n // rows)
  idx = (np.arange(count * rows) * n // (count * rows)).reshape(rows, count).T
  if to_batch is None:
    return tuple(packing.window_batch(*windows.rows(i)) for i in idx)
  return tuple(to_batch(*windows.rows(i), j) for j, i in enumerate(idx))


def load_datasets(cfg: DataConfig, *, workdir: str | os.PathLike,
                  batch_size: int) -> Datasets:
  """Builds (or reuses from the cache and `workdir`) the corpus, tokenizer and
  packed batches. Process 0 prepares first; the others then open what it wrote."""
  from moejax.parallel import hosts  # pylint: disable=g-import-not-at-top
  validate(cfg)
  _positive_int("batch_size", batch_size)
  return hosts.main_first(
      lambda: _load(cfg, as_path(workdir), batch_size, writer=hosts.is_writer()),
      name="data preparation")


def _load(cfg: DataConfig, workdir, batch_size: int, *, writer: bool) -> Datasets:
  """`load_datasets` on one process; only the `writer` trains a tokenizer or
  writes the workdir."""
  import grain  # pylint: disable=g-import-not-at-top
  from moejax.data import mlm, seq2seq  # pylint: disable=g-import-not-at-top
  root = cache_lib.cache_root(cfg.cache_dir, workdir)
  shared = cache_lib.is_shared(cfg.cache_dir)
  lock = (cache_lib.preparation_lock(root, cfg.source) if shared
          else contextlib.nullcontext())
  symbols = (tokenizer.MASK_PIECE,) if cfg.task == "mlm" else ()
  S, T = cfg.seq_len, cfg.target_len or cfg.seq_len  # pylint: disable=invalid-name
  with lock:
    if cfg.task == "seq2seq":
      from moejax.data import parallel  # pylint: disable=g-import-not-at-top
      corpus = parallel.open_pairs(cfg)
      train = lambda: tokenizer.train_on_lines(  # pylint: disable=g-long-lambda
          parallel.sample_sides(corpus, cfg.tokenizer_max_sentences),
          cfg.vocab_size)
    else:
      corpus = sources.open_corpus(cfg, root)
      train = lambda: tokenizer.train_tokenizer(  # pylint: disable=g-long-lambda
          corpus.train, cfg.vocab_size, cfg.tokenizer_max_sentences, symbols)
    key = tokenizer.tokenizer_key(corpus.key, cfg.vocab_size,
                                  cfg.tokenizer_max_sentences, symbols)
    cache_file = root / "tokenizers" / f"{key}.model" if shared else None
    sp, is_new = tokenizer.get_tokenizer(workdir, cfg.vocab_size, train,
                                         cache_file=cache_file, may_train=writer)
    mask_id = tokenizer.mask_id(sp) if cfg.task == "mlm" else None
    if cfg.task == "seq2seq":
      packed = seq2seq.load_or_pack_pairs(corpus, sp, S, T, overlong=cfg.overlong,
                                          cache_root=root)
    else:
      packed = packing.load_or_pack(corpus.train, corpus.validation, sp,
                                    cfg.seq_len, corpus_key=corpus.key,
                                    cache_root=root, test=corpus.test,
                                    total_bytes=corpus.total_bytes,
                                    check=corpus.check, tagged=corpus.tagged)
  n_train, n_eval = len(packed.train), len(packed.validation)
  n_test = len(packed.test)
  L = cfg.seq_len  # pylint: disable=invalid-name
  what = "seq2seq rows" if cfg.task == "seq2seq" else f"sequences of length {L}"
  if n_train < batch_size:
    raise DataError(
        f"the corpus is too small for one training batch: its training split yields "
        f"{n_train} {what} but train.batch_size is {batch_size}; "
        "lower train.batch_size or data.seq_len, or add text")
  if n_eval == 0:
    raise DataError(
        f"the held-out split yields 0 {what}; lower data.seq_len, "
        "raise data.eval_fraction, or add text")
  if cfg.test_fraction and n_test == 0:
    raise DataError(
        f"the test split yields 0 {what}; lower data.seq_len, "
        "raise data.test_fraction, or add text")
  if is_new and writer:  # Once the data is known to work: a bad run leaves none.
    tokenizer.save_tokenizer(sp, workdir / tokenizer.TOKENIZER_FILE)
  to_batch = None
  if cfg.task == "seq2seq":
    sequences = seq2seq.PackedRows(packed.train, S)
    to_batch = lambda t, d, j: seq2seq.row_batch(t, d, S)  # pylint: disable=g-long-lambda
  else:
    sequences = packing.PackedSequences(packed.train)
  # Shuffle before repeat: each epoch is a new permutation (seed + epoch).
  stream = grain.MapDataset.source(sequences).shuffle(seed=cfg.seed).repeat(None)
  if cfg.task == "mlm":
    masking = dict(seed=cfg.seed, mask_id=mask_id, vocab_size=sp.vocab_size(),
                   probability=cfg.mlm_probability)
    stream = stream.map_with_index(
        lambda j, x: mlm.mlm_example(x, j, **masking))
    eval_rows = min(batch_size, n_eval)

    def to_batch(t, d, j):
      return mlm.mlm_example(packing.window_batch(t, d), j * eval_rows,
                             held_out=True, **masking)
  train = stream.batch(batch_size, drop_remainder=True)
  eval_batches = make_eval_batches(packed.validation, batch_size,
                                   cfg.eval_batches, to_batch)
  test_batches = ()
  if n_test:
    test_batches = make_eval_batches(packed.test, batch_size, cfg.eval_batches,
                                     to_batch)
  return Datasets(
      train=train,
      train_sequences_stream=stream,
      eval_batches=eval_batches,
      test_batches=test_batches,
      tokenizer=sp,
      vocab_size=sp.vocab_size(),
      domain_names=packed.domain_names,
      train_sequences=n_train,
      eval_sequences=n_eval,
      test_sequences=n_test,
      train_tokens=(int(packed.token_counts.sum()) if cfg.task == "seq2seq"
                    else packed.train.size),
      token_counts=packed.token_counts,
      seq_len=L,
      batch_size=batch_size,
      source=cfg.source,
      cache_dir=os.fspath(root),
      task=cfg.task,
      target_len=T if cfg.task == "seq2seq" else None,
      mask_id=mask_id,
  )
