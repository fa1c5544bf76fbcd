"""Where the text comes from: `data.source` parsed, read, and opened as a Corpus.

Forms of `data.source`:
- `embedded`: the Python stdlib sources and docs (`moejax.data.embedded`);
- `text:<path or glob>[,<path or glob>...]`: local UTF-8 files, each file's stem its
  domain (files with the same stem share a domain);
- `tfds:<name>[:split]`: a prepared TFDS dataset (array_record) in `data.tfds_data_dir`;
- `parallel:<source glob>,<target glob>`: line-aligned translation pairs, read by
  `moejax.data.parallel` for `data.task=seq2seq` (not a Corpus of documents).
Every source is streamed (`moejax.data.stream`): documents are read, chunked
and carved as they are iterated, never held whole. A corpus's key hashes what
decides its content (for `text:`, the file list, sizes and mtimes, `max_bytes`,
`eval_fraction`, `test_fraction` when > 0); the caches of `moejax.data.cache` are
keyed by it, so a prepared corpus is reused without reading the files again, and
a file that changes while it is prepared is an error (nothing is kept).
"""

import dataclasses
import glob
import os
import pathlib
import re
from collections.abc import Callable, Sequence

from moejax.data import documents as docs_lib
from moejax.data import stream
from moejax.data.config import DataConfig
from moejax.data.corpus import Corpus, corpus_key
from moejax.data.documents import Document
from moejax.errors import DataError

SOURCE_FORMS = ("embedded", "text:<path or glob>[,<path or glob>...]",
                "tfds:<name>[:split]", "parallel:<source glob>,<target glob>")
# A TFDS name may carry a version (`lm1b:1.1.0`); the split follows it after a colon.
_TFDS_RE = re.compile(
    r"^(?P<name>[^:\[\]]+(?::\d+\.[\d*]+\.[\d*]+)?)(?::(?P<split>.+))?$")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """A parsed `data.source`: its kind and what it names."""
  kind: str  # "embedded", "text", "tfds" or "parallel".
  patterns: tuple[str, ...] = ()
  name: str = ""
  split: str = "train"


def parse_source(source: str) -> SourceSpec:
  """Parses `data.source`; a DataError lists the valid forms."""
  forms = ", ".join(SOURCE_FORMS)
  if source == "embedded":
    return SourceSpec("embedded")
  if source.startswith("text:"):
    patterns = tuple(p.strip() for p in source[5:].split(",") if p.strip())
    if not patterns:
      raise DataError(f"data.source {source!r} names no files; use {SOURCE_FORMS[1]}")
    return SourceSpec("text", patterns=patterns)
  if source.startswith("tfds:"):
    m = _TFDS_RE.match(source[5:])
    if m is None:
      raise DataError(
          f"data.source {source!r} is not a TFDS name; use {SOURCE_FORMS[2]}")
    return SourceSpec("tfds", name=m["name"], split=m["split"] or "train")
  if source.startswith("parallel:"):
    from moejax.data import parallel  # pylint: disable=g-import-not-at-top
    return SourceSpec("parallel", patterns=parallel.parse_parallel(source))
  raise DataError(f"unknown data.source {source!r}; valid forms: {forms}")


def text_files(patterns: Sequence[str]) -> list[pathlib.Path]:
  """The files that paths/globs name, in order (each glob sorted), without repeats."""
  out: dict[pathlib.Path, None] = {}
  for pattern in patterns:
    path = os.path.expanduser(pattern)
    if any(c in path for c in "*?["):
      matches = sorted(glob.glob(path, recursive=True))
      files = [m for m in matches if os.path.isfile(m)]
      if not matches:
        raise DataError(f"text source {pattern!r} matches no file (cwd {os.getcwd()}); "
                        "fix the path or glob in data.source")
      if not files:
        raise DataError(f"text source {pattern!r} matches only directories "
                        f"({matches[0]}, ...); give files, e.g. {matches[0]}/*.txt")
    elif os.path.isdir(path):
      raise DataError(f"text source {pattern!r} is a directory; give its files, "
                      f"e.g. text:{os.path.join(pattern, '*.txt')}")
    elif not os.path.isfile(path):
      raise DataError(f"text source {pattern!r} does not exist (cwd {os.getcwd()}); "
                      "fix the path in data.source")
    else:
      files = [path]
    out.update((pathlib.Path(f).resolve(), None) for f in files)
  return list(out)


def _decode(path: pathlib.Path, data: bytes, complete: bool) -> str:
  """UTF-8 text of `data` (a whole file or a prefix cut at a line end)."""
  nul = data.find(b"\0")
  if nul >= 0:
    raise DataError(f"{path} is binary (NUL byte at offset {nul}); "
                    "give only UTF-8 text files in data.source")
  try:
    text = data.decode("utf-8") if complete else docs_lib.utf8_prefix(data)
  except UnicodeDecodeError as e:
    raise DataError(f"{path} is not UTF-8 (byte 0x{data[e.start]:02x} at offset "
                    f"{e.start}); convert it to UTF-8 or leave it out of data.source"
                    ) from None
  return text.removeprefix("\ufeff")


def read_text_files(files: Sequence[pathlib.Path], max_bytes: int | None
                    ) -> list[Document]:
  """One document per non-empty file, domains sharing `max_bytes` evenly (by stem)."""
  domains = list(dict.fromkeys(f.stem for f in files))
  sizes = {d: sum(f.stat().st_size for f in files if f.stem == d) for d in domains}
  budget = dict(zip(domains, docs_lib.share_bytes([sizes[d] for d in domains],
                                                  max_bytes)))
  out = []
  for f in files:
    size = f.stat().st_size
    take = min(size, budget[f.stem])
    with open(f, "rb") as fh:
      data = fh.read(take)
    text = _decode(f, data, complete=take >= size)
    budget[f.stem] = budget[f.stem] - len(data) if take >= size else 0  # Cut: done.
    if text.strip():
      out.append(Document(text, f.stem))
  if not out:
    raise DataError(f"the text corpus is empty ({len(files)} file(s), all empty or "
                    "whitespace); give files with text in data.source")
  return out


def check_carve(counts: stream.Counts, eval_fraction: float,
                test_fraction: float) -> None:
  """DataError when the carve holds out no validation (or, asked for, no test)
  text; `counts` are the stream's chunks and bytes per domain."""
  if not counts.chunks:
    return
  for split, need in (("validation", 2), ("test", 3)):
    if split == "test" and not test_fraction:
      continue
    if any(stream.held_out(n, eval_fraction, test_fraction)[split]
           for n in counts.chunks.values()):
      continue
    if split == "validation":
      for domain, size in counts.bytes.items():
        if size >= 2 * docs_lib.CHUNK_BYTES and counts.chunks[domain] < 2:
          raise DataError(
              f"the text of domain {domain!r} ({size:,} bytes) has no line breaks, "
              f"and validation text is held out in ~{docs_lib.CHUNK_BYTES // 1024} "
              "KiB chunks cut at line ends; break the text into lines (e.g. one "
              "paragraph per line)")
    n = sum(counts.chunks.values())
    raise DataError(
        f"the corpus is too small to hold out {split} text ({n} chunk(s) of "
        f"~{docs_lib.CHUNK_BYTES // 1024} KiB, at least {need} per domain "
        "needed); add text")


def carved_corpus(source: str, key: str, chunks_fn, cfg: DataConfig,
                  empty: Callable[[], None] | None = None,
                  unchanged: Callable[[], None] | None = None) -> Corpus:
  """The Corpus of a chunk stream carved into train, validation and test;
  `empty()` raises for a stream without chunks."""
  def check(counts):
    if not counts.chunks and empty is not None:
      empty()
    check_carve(counts, cfg.eval_fraction, cfg.test_fraction)
  carved = stream.Carved(chunks_fn, cfg.eval_fraction, cfg.test_fraction, check)
  return Corpus(source, key, carved.split("train"), carved.split("validation"),
                carved.split("test") if cfg.test_fraction else (),
                total_bytes=lambda: carved.total_bytes, check=unchanged,
                tagged=carved.tagged)


def open_corpus(cfg: DataConfig, cache: str | os.PathLike) -> Corpus:
  """The train and held-out documents of `cfg.source`, streamed (nothing is read
  until they are iterated). `cache` is unused by every source today."""
  del cache
  spec = parse_source(cfg.source)
  if spec.kind == "parallel":
    raise DataError(f"data.source {cfg.source!r} is a parallel corpus of pairs; "
                    "set data.task=seq2seq to read it")
  carve = (cfg.max_bytes, cfg.eval_fraction, docs_lib.CHUNK_BYTES, "v1")
  if cfg.test_fraction:  # Keys (and caches) without a test split are unchanged.
    carve += (("test_fraction", cfg.test_fraction),)
  if cfg.bad_input != "error":
    carve += (("bad_input", cfg.bad_input),)
  if spec.kind == "embedded":
    from moejax.data import embedded  # pylint: disable=g-import-not-at-top
    key = corpus_key(embedded.fingerprint(), carve)
    return carved_corpus(
        cfg.source, key,
        lambda: stream.document_chunks(embedded.documents(cfg.max_bytes)), cfg)
  if spec.kind == "text":
    files = text_files(spec.patterns)
    stats = stream.file_stats(files)
    key = corpus_key("text", stats, carve)

    def empty():
      raise DataError(f"the text corpus is empty ({len(files)} file(s), all empty "
                      "or whitespace); give files with text in data.source")

    def unchanged():
      now = stream.file_stats(text_files(spec.patterns))
      if now != stats:
        changed = next((a[0] for a, b in zip(stats, now) if a != b),
                       "the file list")
        raise DataError(f"the corpus changed while it was prepared ({changed}); "
                        "nothing was kept: rerun once the files are final")
    return carved_corpus(
        cfg.source, key,
        lambda: stream.text_chunks(files, cfg.max_bytes, cfg.bad_input), cfg,
        empty=empty, unchanged=unchanged)
  from moejax.data import tfds_source  # pylint: disable=g-import-not-at-top
  return tfds_source.open_tfds(spec.name, spec.split, cfg)
