"""Parallel text: `parallel:<source glob>,<target glob>`, line-aligned pairs, streamed.

Line i of the source side pairs with line i of the target side. Each glob's files
are sorted (`sources.text_files`); the k-th source file pairs with the k-th target
file, and each such file pair must hold the same number of lines (cut at "\\n"
only, a "\\r\\n" end allowed, as `wc -l` counts them plus an unterminated last
line). A pair with a blank side is skipped; its number still counts.

Pair j (numbered over all file pairs in order, skipped ones included) goes to the
split `stream.split_of(j, n, eval_fraction, test_fraction)` gives for n pairs:
the chunk-stride rule of the text carve, applied to pairs (every
round(1/eval_fraction)-th pair is held out).

Opening a source makes one pass over its files (bounded memory: a line at a
time) that counts lines and checks them, so a bad input fails before anything is
trained or written: side files that differ in number or in lines, a side with no
text, a NUL or non-UTF-8 byte (file and line number), each a one-line DataError.
The joint tokenizer trains on an evenly spread sample of the training pairs,
half from each side (`sample_sides`).

`TfdsPairs` gives the same interface (`pairs`, `side`, `where`, `key`) over a
prepared TFDS translation dataset (`tfds:<name>[:split]`, `data.languages`).
"""

import dataclasses
import pathlib
from collections.abc import Iterable, Iterator

from moejax.data import stream
from moejax.data.corpus import corpus_key
from moejax.data.documents import Document
from moejax.errors import DataError

FORM = "parallel:<source glob>,<target glob>"
SIDES = ("source", "target")


def parse_parallel(source: str) -> tuple[str, str]:
  """The (source, target) patterns of `parallel:<src>,<tgt>`."""
  parts = [p.strip() for p in source.removeprefix("parallel:").split(",")]
  if len(parts) != 2 or not all(parts):
    raise DataError(f"data.source {source!r} must name two sides; use {FORM}, "
                    "e.g. parallel:data/en.txt,data/es.txt")
  return parts[0], parts[1]


@dataclasses.dataclass(frozen=True)
class Pair:
  """One aligned pair: its number j over the corpus, split, file pair and line."""
  index: int
  split: str
  source: str
  target: str
  file: int  # Index of the file pair.
  line: int  # 1-based line number in both files.


def _lines(path: pathlib.Path) -> Iterator[tuple[int, str]]:
  """(line number, text without its line end) of each line of `path`; a
  DataError names the file and line of a NUL or non-UTF-8 byte."""
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      nul = raw.find(b"\0")
      if nul >= 0:
        raise DataError(f"{path} line {number} has a NUL byte (a binary file?); "
                        "give UTF-8 text files in data.source")
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(f"{path} line {number} is not UTF-8 (byte "
                        f"0x{raw[e.start]:02x}); convert the file to UTF-8"
                        ) from None
      if number == 1:
        text = text.removeprefix("\ufeff")
      yield number, text.removesuffix("\n").removesuffix("\r")


def _scan(path: pathlib.Path) -> tuple[int, int]:
  """(lines, non-blank lines) of `path`, every line checked."""
  n = text = 0
  for n, line in _lines(path):
    text += bool(line.strip())
  return n, text


class ParallelCorpus:
  """The aligned pairs of a `parallel:` source, re-read on each iteration."""

  def __init__(self, source: str, eval_fraction: float, test_fraction: float):
    from moejax.data import sources  # pylint: disable=g-import-not-at-top
    self.source = source
    patterns = parse_parallel(source)
    self.files = [sources.text_files([p]) for p in patterns]
    src, tgt = self.files
    if len(src) != len(tgt):
      raise DataError(
          f"parallel source: {patterns[0]!r} matches {len(src)} file(s) but "
          f"{patterns[1]!r} matches {len(tgt)}; each side needs one file per "
          "file of the other (paired in sorted order)")
    self.eval_fraction, self.test_fraction = eval_fraction, test_fraction
    self.stats = stream.file_stats(src + tgt)
    self.lines = []  # Lines of each file pair.
    text = [0, 0]
    for s, t in zip(src, tgt):
      (ns, ts), (nt, tt) = _scan(s), _scan(t)
      if ns != nt:
        raise DataError(f"parallel files are not line-aligned: {s} has {ns} lines "
                        f"but {t} has {nt}; line i of one must translate line i "
                        "of the other")
      self.lines.append(ns)
      text[0] += ts
      text[1] += tt
    for side, files, count in zip(SIDES, self.files, text):
      if not count:
        raise DataError(f"the {side} side of the parallel source is empty "
                        f"({', '.join(map(str, files))}: no text); give files "
                        "with one sentence per line")
    self.num_pairs = sum(self.lines)
    self.key = corpus_key("parallel-v1", self.stats, eval_fraction,
                          test_fraction)

  def split_of(self, index: int) -> str:
    return stream.split_of(index, self.num_pairs, self.eval_fraction,
                           self.test_fraction)

  def pairs(self, split: str | None = None) -> Iterator[Pair]:
    """The pairs of `split` (None: every split), in order, blank ones skipped."""
    j = 0
    for k, (s, t) in enumerate(zip(*self.files)):
      for (line, src), (_, tgt) in zip(_lines(s), _lines(t)):
        where = self.split_of(j)
        if (split is None or where == split) and src.strip() and tgt.strip():
          yield Pair(j, where, src, tgt, k, line)
        j += 1

  def where(self, pair: Pair) -> str:
    """'<source file> and <target file> line <n>' of `pair`."""
    return (f"{self.files[0][pair.file]} and {self.files[1][pair.file]} line "
            f"{pair.line}")

  def side(self, side: str, split: str = "train") -> "SideDocuments":
    """One side of `split` as documents of one line each (a re-iterable)."""
    return SideDocuments(self, SIDES.index(side), split)

  def check(self) -> None:
    """A DataError if a file changed since the corpus was opened."""
    from moejax.data import sources  # pylint: disable=g-import-not-at-top
    now = stream.file_stats([f for p in parse_parallel(self.source)
                             for f in sources.text_files([p])])
    if now != self.stats:
      changed = next((a[0] for a, b in zip(self.stats, now) if a != b),
                     "the file list")
      raise DataError(f"the parallel corpus changed while it was prepared "
                      f"({changed}); nothing was kept: rerun once the files are "
                      "final")


class SideDocuments(Iterable[Document]):
  """The lines of one side of a split, each a Document (its domain the side)."""

  def __init__(self, corpus: ParallelCorpus, side: int, split: str):
    self._corpus, self._side, self._split = corpus, side, split

  def __iter__(self) -> Iterator[Document]:
    for pair in self._corpus.pairs(self._split):
      yield Document((pair.source, pair.target)[self._side], SIDES[self._side])


def sample_sides(corpus: ParallelCorpus, max_lines: int) -> list[str]:
  """An evenly spread sample of the training pairs' lines, `max_lines // 2`
  from the source side, the rest from the target side (each in order)."""
  from moejax.data.tokenizer import sample_lines  # pylint: disable=g-import-not-at-top
  half = max_lines // 2
  return (sample_lines(corpus.side("source"), max(half, 1))
          + sample_lines(corpus.side("target"), max(max_lines - half, 1)))


class TfdsPairs:
  """The pairs of a prepared TFDS translation dataset (`tfds:<name>[:split]` with
  `data.task=seq2seq`): two string features of each record, by language key
  (`data.languages="<source>,<target>"`; None: the dataset's first two).

  Held out: the dataset's `validation` split (else `test`), else carved from
  the training split by the pair-stride rule; test (`data.test_fraction` > 0):
  its `test` split when validation is another one, else carved."""

  def __init__(self, name: str, split: str, languages: str | None,
               eval_fraction: float, test_fraction: float,
               data_dir: str | None):
    from moejax.data import tfds_source  # pylint: disable=g-import-not-at-top
    self.source = f"tfds:{name}:{split}"
    builder = tfds_source.prepared_builder(name, data_dir)
    info = builder.info
    strings = [k for k, f in info.features.items() if tfds_source.is_string(f)]
    keys = ([k.strip() for k in languages.split(",")] if languages
            else strings[:2])
    if len(keys) != 2 or not set(keys) <= set(strings) or keys[0] == keys[1]:
      raise DataError(f"TFDS dataset {name!r} has text features {strings}; set "
                      "data.languages to two of them as '<source>,<target>' (got "
                      f"{languages!r})")
    self.keys = keys
    self.eval_fraction, self.test_fraction = eval_fraction, test_fraction
    held = next((s for s in ("validation", "test") if s in info.splits
                 and s != split), None)
    test = ("test" if test_fraction and held == "validation"
            and "test" in info.splits and split != "test" else None)
    self._splits = {"train": split, "validation": held, "test": test}
    self._open = lambda s: tfds_source.data_source(name, s, data_dir)
    self.num_pairs = info.splits[split].num_examples
    self.key = corpus_key("tfds-pairs-v1", name, split, str(builder.data_dir),
                          str(builder.version), keys, held, test,
                          {s: info.splits[s].num_examples for s in info.splits},
                          eval_fraction, test_fraction)

  def split_of(self, index: int) -> str:
    """The split pair `index` of the training split goes to."""
    if self._splits["validation"] is None:
      return stream.split_of(index, self.num_pairs, self.eval_fraction,
                             self.test_fraction)
    if self.test_fraction and self._splits["test"] is None:
      # Validation is a split of its own: test is carved alone, by its stride.
      where = stream.split_of(index, self.num_pairs, self.test_fraction, 0.0)
      return "test" if where == "validation" else "train"
    return "train"

  def _decode(self, record: dict, i: int, tfds_split: str) -> list[str]:
    out = []
    for key in self.keys:
      value = record[key]
      try:
        out.append(value.decode("utf-8") if isinstance(value, bytes)
                   else str(value))
      except UnicodeDecodeError:
        raise DataError(f"{self.source.rsplit(':', 1)[0]}:{tfds_split} record {i} "
                        f"field {key!r} is not UTF-8") from None
    return out

  def pairs(self, split: str | None = None) -> Iterator[Pair]:
    """The pairs of `split` (None: every split), blank ones skipped."""
    for k, which in enumerate(("train", "validation", "test")):
      name = self._splits[which]
      if name is None or (which != "train" and split not in (None, which)):
        continue
      records = self._open(name)
      for j in range(len(records)):
        where = self.split_of(j) if which == "train" else which
        if split is not None and where != split:
          continue
        src, tgt = self._decode(records[j], j, name)
        if src.strip() and tgt.strip():
          yield Pair(j, where, src, tgt, k, j)

  def where(self, pair: Pair) -> str:
    name = self._splits[("train", "validation", "test")[pair.file]]
    return f"{self.source.rsplit(':', 1)[0]}:{name} record {pair.line}"

  def side(self, side: str, split: str = "train") -> "SideDocuments":
    return SideDocuments(self, SIDES.index(side), split)

  def check(self) -> None:
    """TFDS datasets are immutable once prepared: nothing to check."""


def open_pairs(cfg) -> "ParallelCorpus | TfdsPairs":
  """The pairs of a seq2seq `DataConfig`'s source: line-aligned files
  (`parallel:`) or a TFDS translate dataset (`tfds:`); DataError otherwise."""
  from moejax.data import sources  # pylint: disable=g-import-not-at-top
  spec = sources.parse_source(cfg.source)
  if spec.kind == "tfds":
    return TfdsPairs(spec.name, spec.split, cfg.languages, cfg.eval_fraction,
                     cfg.test_fraction, cfg.tfds_data_dir)
  if spec.kind == "parallel":
    return ParallelCorpus(cfg.source, cfg.eval_fraction, cfg.test_fraction)
  raise DataError(f"data.source {cfg.source!r} holds no translation pairs; use "
                  "parallel:<source file>,<target file> or a tfds: translate "
                  "dataset")
