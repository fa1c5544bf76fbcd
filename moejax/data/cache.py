"""The data cache: prepared corpora, tokenizers and packed windows, shared by runs.

`data.cache_dir` says where it lives:
- unset (None): the user cache dir, `$MOEJAX_CACHE_DIR`, else
  `$XDG_CACHE_HOME/moejax`, else `~/.cache/moejax`: a second workdir on the same
  corpus reuses the tokenizer and the packed windows;
- `""`: `<workdir>/data`, a cache per workdir (the workdir's `tokenizer.model`
  is then the only tokenizer kept);
- any other path, local or a URI epath supports (`gs://...`).

Layout (keys hash what decides the content; a changed corpus gets new keys):
  <cache>/tokenizers/<tokenizer key>.model   SentencePiece models (shared caches)
  <cache>/packed/<packing key>/...           packed windows (`moejax.data.packing`)
  <cache>/locks/<source key>.lock            held while a source is prepared

Two runs (or processes) preparing the same source at once take turns on the
lock (`fcntl.flock`, local file systems); the second finds everything built.
On an object store there is no lock: within a run only process 0 prepares
(`moejax.parallel.hosts.main_first`), and each item is written whole.
"""

import contextlib
import fcntl
import os
from collections.abc import Iterator

from etils import epath

from moejax.data.corpus import corpus_key
from moejax.paths import as_path, is_local

WORKDIR_CACHE = "data"  # `data.cache_dir=""`: the cache under the workdir.


def user_cache_dir() -> epath.Path:
  """`$MOEJAX_CACHE_DIR`, else `$XDG_CACHE_HOME/moejax`, else `~/.cache/moejax`."""
  if os.environ.get("MOEJAX_CACHE_DIR"):
    return as_path(os.environ["MOEJAX_CACHE_DIR"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
  return as_path(os.path.join(base, "moejax"))


def cache_root(cache_dir: str | None, workdir: str | os.PathLike) -> epath.Path:
  """The directory the data cache of a run in `workdir` lives in."""
  if cache_dir is None:
    return user_cache_dir()
  if cache_dir == "":
    return as_path(workdir) / WORKDIR_CACHE
  return as_path(cache_dir)


def is_shared(cache_dir: str | None) -> bool:
  """True unless the cache is the workdir's own (`data.cache_dir=""`)."""
  return cache_dir != ""


@contextlib.contextmanager
def preparation_lock(root: epath.Path, source: str) -> Iterator[None]:
  """Holds an exclusive lock on preparing `source` in the cache at `root`
  (local file systems; nothing on object stores)."""
  if not is_local(root):
    yield
    return
  locks = root / "locks"
  locks.mkdir(parents=True, exist_ok=True)
  with open(locks / f"{corpus_key(source)}.lock", "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)  # Released when the file closes.
    yield
