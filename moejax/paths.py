"""Workdir and cache paths: one type, `etils.epath.Path`, from the CLI down.

A path is local (`/tmp/run`) or a URI that epath supports (`gs://bucket/run`,
`s3://...`); every file of a run goes through these paths (orbax writes its
checkpoints through tensorstore, which takes the same strings). Object stores
have no append and no atomic "create if absent", so the two helpers that need
them fall back to what such a store can do.
"""

import os

from etils import epath

PathLike = str | os.PathLike


def as_path(path: PathLike) -> epath.Path:
  """`path` as an epath Path (`~` expanded for local paths)."""
  if isinstance(path, str) and "://" not in path:
    path = os.path.expanduser(path)
  return epath.Path(path)


def is_local(path: PathLike) -> bool:
  """True for a path on the local file system (not a `scheme://` URI)."""
  return "://" not in os.fspath(path)


def append_text(path: epath.Path, text: str) -> None:
  """Appends `text` to the file at `path` (created if absent).

  Local files are opened for append; an object (gs://, s3://) is rewritten
  whole, since object stores cannot append.
  """
  if is_local(path):
    with path.open("a") as f:
      f.write(text)
    return
  old = path.read_text() if path.exists() else ""
  path.write_text(old + text)


def write_new(path: epath.Path, data: bytes) -> bool:
  """Writes `data` to `path` unless a file is there already; False if it was.

  Local: written to a temporary file and hard-linked into place, so a reader
  never sees a partial file and of two racing writers exactly one wins. An
  object store writes each object whole; there the first check decides.
  """
  path.parent.mkdir(parents=True, exist_ok=True)
  if not is_local(path):
    if path.exists():
      return False
    path.write_bytes(data)
    return True
  tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
  tmp.write_bytes(data)
  try:
    os.link(tmp, path)  # Atomic, and fails rather than replace an existing file.
    return True
  except FileExistsError:
    return False
  except OSError:  # No hard links on this file system: exclusive create.
    try:
      with open(path, "xb") as f:
        f.write(data)
      return True
    except FileExistsError:
      return False
  finally:
    tmp.unlink()
