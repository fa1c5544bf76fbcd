"""The `embedded` corpus: the Python standard library's own sources and documentation.

Why this text: it is present on every machine that has Python, so `pip install` alone
gives a corpus that works offline, in CI and on accelerator hosts with no data mounted.
It is real, human-written text in two natural domains, which a Mixture-of-Experts
needs to show expert specialisation:
- `code`: the pure-Python stdlib modules (`sysconfig.get_paths()["stdlib"]`, sorted by
  path, without site-packages, test suites, idlelib, lib2to3, turtledemo, ensurepip,
  or files that are not UTF-8);
- `docs`: the English reference documentation shipped in `pydoc_data/topics.py`
  (the `topics` dict, one document per topic, sorted by topic name).
Its exact content varies with the Python version (and patch release); every cache is
keyed by a fingerprint of the files, so a different Python builds its own dataset.
"""

import os
import pathlib
import sys
import sysconfig
from collections.abc import Iterator

from moejax.data.documents import Document, cap_documents, share_bytes, utf8_len
from moejax.errors import DataError

DOMAINS = ("code", "docs")
SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
    "turtledemo", "ensurepip", "__pycache__",
})


def stdlib_dir() -> pathlib.Path:
  """The directory of the running Python's pure-Python standard library."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def code_files(root: pathlib.Path | None = None) -> list[pathlib.Path]:
  """Stdlib `.py` files under `root`, sorted by relative path, skipping SKIP_DIRS."""
  root = root or stdlib_dir()
  found = []
  for here, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
    found.extend(pathlib.Path(here, f) for f in files if f.endswith(".py"))
  return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def docs_topics() -> list[tuple[str, str]]:
  """(topic, text) pairs of `pydoc_data.topics`, sorted; empty where not shipped."""
  try:
    from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  except ImportError:
    return []
  return sorted((k, v) for k, v in topics.topics.items() if v.strip())


def fingerprint() -> tuple:
  """What identifies this corpus: Python version and every source file's size/mtime."""
  root = stdlib_dir()
  files = []
  for path in code_files(root):
    st = path.stat()
    files.append((path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
  topics = [(k, len(v)) for k, v in docs_topics()]
  return ("embedded", sys.version, str(root), tuple(files), tuple(topics))


def _code_documents(files: list[pathlib.Path]) -> Iterator[Document]:
  """Code documents in file order, skipping files that are not UTF-8 text."""
  for path in files:
    data = path.read_bytes()
    if b"\0" in data:
      continue
    try:
      yield Document(data.decode("utf-8"), "code")
    except UnicodeDecodeError:
      continue


def documents(max_bytes: int | None) -> list[Document]:
  """The corpus as documents, code first then docs, capped at `max_bytes` in total.

  The budget is shared between the two domains (half each, a domain smaller than its
  half leaving the rest to the other); each takes its documents in sorted order,
  reading only as many files as it needs.
  """
  files = code_files()
  topics = docs_topics()
  if not files:
    raise DataError(
        f"the embedded corpus found no Python sources under {stdlib_dir()}; "
        "set data.source to text:<files> or tfds:<name>")
  sizes = [sum(p.stat().st_size for p in files),
           sum(utf8_len(t) for _, t in topics)]
  code_budget, docs_budget = share_bytes(sizes, max_bytes)
  return (cap_documents(_code_documents(files), code_budget)
          + cap_documents((Document(t, "docs") for _, t in topics), docs_budget))
