"""Where the text comes from: `data.source` parsed, read, and opened as a Corpus.

Forms of `data.source`:
- `embedded`: the Python stdlib sources and docs (`moejax.data.embedded`);
- `text:<path or glob>[,<path or glob>...]`: local UTF-8 files, each file's stem its
  domain (files with the same stem share a domain);
- `tfds:<name>[:split]`: a prepared TFDS dataset (array_record) in `data.tfds_data_dir`.
`embedded` and `text:` are written once as the TFDS dataset `moejax_text` under
`<cache>/tfds/<key>/` (`moejax.data.cache`), where `key` hashes the file list,
sizes and mtimes, `max_bytes`, `eval_fraction` and `test_fraction` (when > 0); a
changed corpus gets a new key, an unchanged one is reused without reading the
files again.
"""

import dataclasses
import glob
import os
import pathlib
import re
from collections.abc import Callable, Sequence

from moejax.data import documents as docs_lib
from moejax.data.config import DataConfig
from moejax.data.corpus import Corpus, RecordDocuments, corpus_key
from moejax.data.documents import Document
from moejax.errors import DataError

SOURCE_FORMS = ("embedded", "text:<path or glob>[,<path or glob>...]",
                "tfds:<name>[:split]")
# A TFDS name may carry a version (`lm1b:1.1.0`); the split follows it after a colon.
_TFDS_RE = re.compile(
    r"^(?P<name>[^:\[\]]+(?::\d+\.[\d*]+\.[\d*]+)?)(?::(?P<split>.+))?$")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """A parsed `data.source`: its kind and what it names."""
  kind: str  # "embedded", "text" or "tfds".
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


def _check_line_breaks(docs: Sequence[Document]) -> None:
  """DataError for a domain with text for two chunks but too few line ends to
  cut it into them (the held-out split is cut at line ends)."""
  sizes: dict[str, int] = {}
  chunks: dict[str, int] = {}
  for doc in docs:
    sizes[doc.domain] = sizes.get(doc.domain, 0) + docs_lib.utf8_len(doc.text)
    chunks[doc.domain] = chunks.get(doc.domain, 0) + len(
        docs_lib.chunk_text(doc.text))
  for domain, size in sizes.items():
    if size >= 2 * docs_lib.CHUNK_BYTES and chunks[domain] < 2:
      raise DataError(
          f"the text of domain {domain!r} ({size:,} bytes) has no line breaks, "
          f"and validation text is held out in ~{docs_lib.CHUNK_BYTES // 1024} KiB "
          "chunks cut at line ends; break the text into lines (e.g. one "
          "paragraph per line)")


def _carved(read: Callable[[], list[Document]], eval_fraction: float,
            test_fraction: float):
  """Reads documents and carves them; a DataError when nothing can be held out."""
  def documents_fn():
    docs = read()
    splits = docs_lib.carve_splits(docs, eval_fraction, test_fraction)
    for split, need in (("validation", 2), ("test", 3)):
      if not getattr(splits, split) and (split == "validation" or test_fraction):
        if split == "validation":
          _check_line_breaks(docs)
        n = sum(len(docs_lib.chunk_text(d.text)) for d in docs)
        raise DataError(
            f"the corpus is too small to hold out {split} text ({n} chunk(s) of "
            f"~{docs_lib.CHUNK_BYTES // 1024} KiB, at least {need} per domain "
            "needed); add text")
    return splits
  return documents_fn


def _built_corpus(source: str, key: str, read: Callable[[], list[Document]],
                  cfg: DataConfig, cache: os.PathLike) -> Corpus:
  """Writes (once) and opens the `moejax_text` dataset of an embedded/text: source."""
  from moejax.data import text_builder  # pylint: disable=g-import-not-at-top
  builder = text_builder.prepare(
      _carved(read, cfg.eval_fraction, cfg.test_fraction),
      os.path.join(os.fspath(cache), "tfds", key))
  splits = text_builder.data_sources(builder)
  domain_of = lambda r: r["domain"].decode("utf-8")
  docs = {split: RecordDocuments(records, "text", domain_of, source)
          for split, records in splits.items()}
  return Corpus(source, key, docs["train"], docs["validation"],
                docs.get("test", ()))


def open_corpus(cfg: DataConfig, cache: str | os.PathLike) -> Corpus:
  """The train and held-out documents of `cfg.source` (embedded and text:
  datasets built under `<cache>/tfds/` when absent)."""
  spec = parse_source(cfg.source)
  carve = (cfg.max_bytes, cfg.eval_fraction, docs_lib.CHUNK_BYTES, "v1")
  if cfg.test_fraction:  # Keys (and caches) without a test split are unchanged.
    carve += (("test_fraction", cfg.test_fraction),)
  if spec.kind == "embedded":
    from moejax.data import embedded  # pylint: disable=g-import-not-at-top
    key = corpus_key(embedded.fingerprint(), carve)
    return _built_corpus(cfg.source, key, lambda: embedded.documents(cfg.max_bytes),
                         cfg, cache)
  if spec.kind == "text":
    files = text_files(spec.patterns)
    stats = [(os.fspath(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = corpus_key("text", stats, carve)
    return _built_corpus(cfg.source, key,
                         lambda: read_text_files(files, cfg.max_bytes), cfg, cache)
  from moejax.data import tfds_source  # pylint: disable=g-import-not-at-top
  return tfds_source.open_tfds(spec.name, spec.split, cfg)
