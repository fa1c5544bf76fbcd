"""The errors moejax raises for bad input: one line that names the problem and the fix.

`warn(message)` prints the one-line warnings of a run that goes on (a damaged
checkpoint moved aside, a stale lock taken over, a partial log line repaired).
"""

import errno as errno_lib
import os
import shutil
import sys


class MoejaxError(Exception):
  """Base class: the CLI prints these as a single `moejax: error: ...` line."""


class ConfigError(MoejaxError, ValueError):
  """An invalid configuration value (unknown name, non-positive size, ...)."""


class DataError(MoejaxError, ValueError):
  """A data source that cannot be used (missing, empty, binary, too small)."""


class CheckpointError(MoejaxError):
  """A workdir whose checkpoints or files do not match the run."""


class TrainingDiverged(MoejaxError, FloatingPointError):
  """A non-finite loss; nothing from the diverged step is saved."""


class StorageError(MoejaxError, OSError):
  """The workdir cannot be written (disk full, read-only, I/O error); what was
  saved before is kept."""


class WorkdirBusy(MoejaxError):
  """Another run holds the workdir's lock."""


class Interrupted(KeyboardInterrupt):
  """Training stopped on SIGTERM or SIGINT after saving a checkpoint.

  Like KeyboardInterrupt it is not an `Exception`, so `except Exception`
  handlers (say, one that skips a failed experiment) let a stop through.

  Attributes:
    exit_code: 0 after SIGTERM (a preemption notice), 130 after SIGINT.
  """

  def __init__(self, message: str, *, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


def warn(message: str) -> None:
  """Prints `moejax: warning: <message>` as one line on stderr."""
  print(f"moejax: warning: {' '.join(message.split())}", file=sys.stderr,
        flush=True)


def free_space(path: str | os.PathLike) -> str:
  """Free space on the filesystem of `path` (or its nearest existing parent),
  e.g. '1.5 MiB free', or '' where it cannot be measured (remote paths)."""
  if "://" in os.fspath(path):
    return ""
  path = os.path.abspath(os.fspath(path))
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    free = float(shutil.disk_usage(path).free)
  except (OSError, ValueError):
    return ""
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if free < 1024 or unit == "TiB":
      return f"{free:.0f} {unit} free" if unit == "B" else f"{free:.1f} {unit} free"
    free /= 1024
  return ""


def storage_error(what: str, path: str | os.PathLike, cause: BaseException | str,
                  *, kept: str = "", fix: str = "") -> StorageError:
  """A one-line StorageError: what could not be written where, why, and the
  free space there; `kept` says what survives (e.g. the last checkpoint), `fix`
  what to do (default: free space, or fix the problem, and resume)."""
  if isinstance(cause, OSError) and cause.errno is not None:
    reason = os.strerror(cause.errno)
  else:
    reason = " ".join(str(cause).split())[:200] or type(cause).__name__
  # Free space says nothing about a read-only disk or a permission problem.
  space = "" if isinstance(cause, OSError) and cause.errno in (
      errno_lib.EROFS, errno_lib.EACCES, errno_lib.EPERM) else free_space(path)
  full = isinstance(cause, OSError) and cause.errno in (
      errno_lib.ENOSPC, errno_lib.EDQUOT, errno_lib.EFBIG)
  fix = fix or (f"{'free space' if full else 'fix the problem'} and run the "
                "same command to resume")
  parts = [f"cannot write {what} {os.fspath(path)}: {reason}"
           + (f" ({space})" if space else "")]
  if kept:
    parts.append(kept)
  parts.append(fix)
  error = StorageError("; ".join(parts))
  if isinstance(cause, OSError):
    error.errno = cause.errno
  return error
