"""SentencePiece BPE tokenizer, trained offline on the training split, cached.

Fixed special ids, so the model and the loss can rely on them:
  PAD_ID = 0  `<pad>`  never produced by packing (every position is a real token)
  UNK_ID = 1  `<unk>`  practically unused: byte fallback encodes any character
  BOS_ID = 2  `<s>`    not inserted by packing
  EOS_ID = 3  `</s>`   appended after every document by packing
Ids 4..259 are the 256 byte pieces `<0x00>`..`<0xFF>`; learned pieces follow.
A masked-LM tokenizer (`data.task=mlm`) also holds `MASK_PIECE` (`<mask>`) as a
control symbol: SentencePiece gives it id 4 (`mask_id(sp)`), so its byte pieces
are 5..260; encoding text never produces it (a literal "<mask>" in the text stays
text), and decoding renders it as nothing.
Normalisation is the identity and whitespace is kept, so code indentation survives;
newlines and tabs encode as byte pieces, and `decode(encode(text)) == text`.

SentencePiece is imported on first use, so these ids import anywhere.
The model is kept as `<workdir>/tokenizer.model`; an existing file is always reused
(never retrained or overwritten), even if the corpus changed. A shared data cache
also keeps it by corpus (`tokenizer_key`), so another workdir on the same corpus
copies it instead of training again.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from moejax.data.corpus import corpus_key
from moejax.data.documents import Document
from moejax.errors import DataError
from moejax.paths import as_path, write_new

if TYPE_CHECKING:
  import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
RESERVED_PIECES = 4 + 256  # Special and byte pieces: a vocabulary needs more.
MASK_PIECE = "<mask>"  # The masked-LM mask symbol (a control symbol).
TOKENIZER_FILE = "tokenizer.model"


def _doc_lines(docs: Sequence[Document]) -> Iterator[list[str]]:
  """The non-blank lines of each document."""
  for doc in docs:
    yield [line for line in doc.text.splitlines() if line.strip()]


def sample_lines(docs: Sequence[Document], max_lines: int) -> list[str]:
  """At most `max_lines` non-blank lines of `docs`, evenly spaced, in order
  (two passes over `docs`, which may be a stream: memory is the sample's)."""
  total = sum(len(lines) for lines in _doc_lines(docs))
  if total <= max_lines:
    return [line for lines in _doc_lines(docs) for line in lines]
  out, seen, k = [], 0, 0  # Keep line i * total // max_lines, i = 0, 1, ...
  for lines in _doc_lines(docs):
    while k < max_lines and (want := k * total // max_lines) < seen + len(lines):
      out.append(lines[want - seen])
      k += 1
    seen += len(lines)
  return out


def _training_error(e: RuntimeError, vocab_size: int) -> DataError:
  """A one-line DataError for SentencePiece's vocabulary-size failures."""
  msg = str(e)
  if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", msg):
    return DataError(f"data.vocab_size={vocab_size} is below the {m[1]} pieces this "
                     f"corpus needs (4 special + 256 bytes + its characters); raise "
                     f"data.vocab_size to at least {m[1]}")
  if m := re.search(r"Vocabulary size too high .*<= (\d+)", msg):
    return DataError(f"the training text is too small for data.vocab_size="
                     f"{vocab_size} (SentencePiece reaches at most {m[1]}); lower "
                     f"data.vocab_size to <= {m[1]} or add text")
  first = msg.strip().splitlines()[0] if msg.strip() else "unknown error"
  return DataError(f"SentencePiece training failed ({first}); check data.vocab_size "
                   "and the corpus")


def train_tokenizer(docs: Sequence[Document], vocab_size: int,
                    max_sentences: int, control_symbols: Sequence[str] = ()
                    ) -> spm.SentencePieceProcessor:
  """Trains a byte-fallback BPE model on a deterministic sample of lines, in memory."""
  return train_on_lines(sample_lines(docs, max_sentences), vocab_size,
                        control_symbols)


def train_on_lines(lines: Sequence[str], vocab_size: int,
                   control_symbols: Sequence[str] = ()
                   ) -> spm.SentencePieceProcessor:
  """Trains the model of `train_tokenizer` on `lines` (already sampled);
  `control_symbols` get the ids after EOS (e.g. `MASK_PIECE`: id 4)."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  if not lines:
    raise DataError("the training split has no text to train the tokenizer on; "
                    "add text to data.source")
  model = io.BytesIO()
  extra = {"control_symbols": list(control_symbols)} if control_symbols else {}
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=0.9995,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=True,
        max_sentence_length=1 << 16, num_threads=min(16, os.cpu_count() or 1),
        minloglevel=2, **extra)
  except RuntimeError as e:
    raise _training_error(e, vocab_size) from None
  return spm.SentencePieceProcessor(model_proto=model.getvalue())


def mask_id(sp: spm.SentencePieceProcessor) -> int:
  """The id of `MASK_PIECE` in `sp`; a DataError if `sp` has none."""
  i = sp.piece_to_id(MASK_PIECE)
  if not sp.is_control(i) or sp.id_to_piece(i) != MASK_PIECE:
    raise DataError(f"the tokenizer has no {MASK_PIECE} symbol (it was trained "
                    "without data.task=mlm); use a fresh workdir")
  return i


def tokenizer_key(corpus: str, vocab_size: int, max_sentences: int,
                  control_symbols: Sequence[str] = ()) -> str:
  """The cache key of the model `train_tokenizer` makes from corpus `corpus`
  (keys without control symbols are those of earlier versions)."""
  if control_symbols:
    return corpus_key("spm-bpe-v1", corpus, vocab_size, max_sentences,
                      tuple(control_symbols))
  return corpus_key("spm-bpe-v1", corpus, vocab_size, max_sentences)


def load_tokenizer(path: str | os.PathLike,
                   vocab_size: int | None = None) -> spm.SentencePieceProcessor:
  """Loads a cached model; a DataError if unreadable or its vocab size differs."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  try:
    sp = spm.SentencePieceProcessor(model_proto=as_path(path).read_bytes())
  except (OSError, RuntimeError):
    raise DataError(f"{path} is not a SentencePiece model; move it away or use a "
                    "fresh workdir") from None
  if vocab_size is not None and sp.vocab_size() != vocab_size:
    raise DataError(f"{path} has vocab size {sp.vocab_size()} but data.vocab_size is "
                    f"{vocab_size}; set data.vocab_size={sp.vocab_size()} or use a "
                    "fresh workdir")
  if (sp.pad_id(), sp.eos_id()) != (PAD_ID, EOS_ID):
    raise DataError(f"{path} has pad/eos ids {sp.pad_id()}/{sp.eos_id()}, not "
                    f"{PAD_ID}/{EOS_ID}; use a fresh workdir to train a new tokenizer")
  return sp


def save_tokenizer(sp: spm.SentencePieceProcessor, path: str | os.PathLike) -> bool:
  """Writes the model to `path` unless a file is already there (never
  overwrites); False when one was (a racing process saved first: keep theirs)."""
  return write_new(as_path(path), sp.serialized_model_proto())


def get_tokenizer(workdir: str | os.PathLike, vocab_size: int,
                  train: Callable[[], spm.SentencePieceProcessor], *,
                  cache_file: str | os.PathLike | None = None,
                  may_train: bool = True
                  ) -> tuple[spm.SentencePieceProcessor, bool]:
  """(tokenizer, is_new): the workdir's model, else the cache's, else a new one.

  `is_new` says the workdir has none yet (it is saved there only once the data
  is known to work). A new model goes to `cache_file` at once, if given.
  `may_train=False` (processes other than 0) turns a missing model into a
  DataError instead of a second, different tokenizer. `train()` trains the
  new model (`train_tokenizer` on a corpus, `train_on_lines` on a sample).
  """
  path = as_path(workdir) / TOKENIZER_FILE
  if path.exists():
    return load_tokenizer(path, vocab_size), False
  if cache_file is not None and as_path(cache_file).exists():
    return load_tokenizer(cache_file, vocab_size), True
  if not may_train:
    raise DataError(
        f"{path} is missing after process 0 prepared the data; the workdir must "
        "be on storage every process sees (a shared file system or gs://)")
  sp = train()
  if cache_file is not None and not save_tokenizer(sp, cache_file):
    sp = load_tokenizer(cache_file, vocab_size)  # Another run saved one first.
  return sp, True
