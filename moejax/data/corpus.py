"""What every source becomes: a Corpus of train and held-out documents, and the
key that identifies it (the caches of `moejax.data.cache` are keyed by it).

`RecordDocuments` reads documents lazily from TFDS records.
"""

import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence

from moejax.data.documents import Document
from moejax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Train and held-out documents of a source, and the key that identifies them;
  `test` is empty unless `data.test_fraction` > 0."""
  source: str
  key: str
  train: Iterable[Document]  # Re-iterable: each pass reads the source again.
  validation: Iterable[Document]
  test: Iterable[Document] = ()
  # The text of every split, in bytes (for progress reports; None: unknown).
  total_bytes: Callable[[], int | None] = lambda: None
  check: Callable[[], None] | None = None  # Raises if the source changed.
  # Every split's documents in one pass, as (split, document) (None: per split).
  tagged: Callable[[], Iterator[tuple[str, Document]]] | None = None


def corpus_key(*parts) -> str:
  """A short stable hash of `parts` (their repr)."""
  return hashlib.sha256(repr(parts).encode("utf-8")).hexdigest()[:16]


class RecordDocuments(Sequence[Document]):
  """Documents read lazily from TFDS records (dicts of bytes/ints)."""

  def __init__(self, records: Sequence[dict], text_key: str,
               domain_of: Callable[[dict], str], name: str):
    self._records, self._text_key = records, text_key
    self._domain_of, self._name = domain_of, name

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    if not -len(self) <= i < len(self):
      raise IndexError(f"document {i} out of range [0, {len(self)})")
    record = self._records[i % len(self)]
    value = record[self._text_key]
    try:
      text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError as e:
      raise DataError(f"{self._name} record {i} field {self._text_key!r} is not UTF-8 "
                      f"(offset {e.start}); pick a dataset with UTF-8 text") from None
    return Document(text, self._domain_of(record))

  def __iter__(self) -> Iterator[Document]:
    return (self[i] for i in range(len(self)))
