"""Records every file-system write a process makes under a folder (audit hooks).

`install(log, prefix)` adds a `sys.addaudithook` hook that appends one line,
`<event>\t<absolute path>`, to the file `log` for each write under `prefix`:
`open` for writing, `os.mkdir`, `os.rename`/`os.replace` (both paths),
`os.remove`, `os.rmdir`, `os.link`, `os.symlink`, `os.truncate`,
`shutil.copyfile`, `shutil.rmtree`. Python-level calls only: writes made inside
C++ libraries (tensorstore for orbax checkpoints, array_record for TFDS) are not
seen. `read(log)` parses the file back.
"""

import os
import sys

_WRITE_MODES = frozenset("wax+")
_WRITE_FLAGS = (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC)
# event -> positions of the path arguments it writes.
_PATH_ARGS = {
    "os.mkdir": (0,), "os.rename": (0, 1), "os.remove": (0,), "os.rmdir": (0,),
    "os.link": (1,), "os.symlink": (1,), "os.truncate": (0,),
    "shutil.copyfile": (1,), "shutil.rmtree": (0,),
}


def _path(arg) -> str | None:
  if isinstance(arg, int) or arg is None:
    return None  # A file descriptor: its open was recorded already.
  try:
    return os.path.abspath(os.fsdecode(arg))
  except TypeError:
    return None


def install(log: str, prefix: str) -> None:
  """Starts recording writes under `prefix` into the file `log`."""
  fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
  prefix = os.path.abspath(prefix)

  def record(event: str, path: str | None) -> None:
    if path and (path == prefix or path.startswith(prefix + os.sep)):
      os.write(fd, f"{event}\t{path}\n".encode("utf-8", "surrogateescape"))

  def hook(event: str, args: tuple) -> None:
    if event == "open":
      path, mode, flags = (tuple(args) + (None, None, 0))[:3]
      writes = (bool(_WRITE_MODES & set(mode)) if isinstance(mode, str)
                else bool((flags or 0) & _WRITE_FLAGS))
      if writes:
        record("open", _path(path))
    elif event in _PATH_ARGS:
      for i in _PATH_ARGS[event]:
        if i < len(args):
          record(event, _path(args[i]))

  sys.addaudithook(hook)


def read(log: str) -> list[tuple[str, str]]:
  """The (event, path) pairs recorded in `log` (none if it does not exist)."""
  if not os.path.exists(log):
    return []
  with open(log, encoding="utf-8", errors="surrogateescape") as f:
    return [tuple(line.rstrip("\n").split("\t", 1)) for line in f if "\t" in line]
