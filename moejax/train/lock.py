"""One run per workdir: a lock file that names the host and process holding it.

`WorkdirLock(workdir)` creates `<workdir>/run.lock` (JSON: host, pid, start time,
heartbeat) before the run writes anything, refreshes its heartbeat every
`heartbeat_s` seconds from a daemon thread, and removes it when the run ends.
A second run on the workdir stops with one line (`WorkdirBusy`). A lock left by
a run that died (kill -9, a crashed host) is stale and is taken over with a
warning:
- same host: its process is gone (or its pid now belongs to a newer process);
- another host: its heartbeat is older than `stale_after_s` (pids of other
  hosts cannot be checked);
- unreadable (a run killed while creating it) and older than a minute.
On local disks the lock is created with O_EXCL, so two runs started together
cannot both get it; on object stores (gs://) it is checked then written.
"""

import json
import os
import secrets
import socket
import threading
import time
from typing import Any

from etils import epath

from moejax.errors import StorageError, WorkdirBusy, storage_error, warn
from moejax.paths import as_path, is_local

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
_UNREADABLE_GRACE_S = 60.0


def _start_ticks(pid: int) -> int | None:
  """The start time of process `pid` in clock ticks since boot (Linux), which
  tells a live pid from a reused one; None where /proc is absent."""
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      # Field 22; the command name (field 2) may hold spaces, so split after ')'.
      return int(f.read().rsplit(b")", 1)[1].split()[19])
  except (OSError, ValueError, IndexError):
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Alive, owned by another user.
  return True


class WorkdirLock:
  """Context manager holding `<workdir>/run.lock` for the length of a run."""

  def __init__(self, workdir: str | os.PathLike, *,
               heartbeat_s: float = HEARTBEAT_S,
               stale_after_s: float = STALE_AFTER_S):
    self.workdir = as_path(workdir)
    self.path = self.workdir / LOCK_FILE
    self.heartbeat_s = heartbeat_s
    self.stale_after_s = stale_after_s
    self._record: dict[str, Any] = {}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._created_workdir = False

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> None:
    """Takes the lock; WorkdirBusy if a live run holds it, StorageError if the
    workdir cannot be written."""
    try:
      if not self.workdir.exists():
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._created_workdir = True
    except OSError as e:
      raise self._unwritable(e) from None
    now = time.time()
    self._record = {"host": socket.gethostname(), "pid": os.getpid(),
                    "start_ticks": _start_ticks(os.getpid()),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "heartbeat": now, "token": secrets.token_hex(8)}
    for _ in range(3):
      if self._create():
        break
      holder = self._read()
      reason = self._stale(holder)
      if reason is None:
        self._release_workdir()
        raise WorkdirBusy(self._busy_message(holder))
      warn(f"took over the stale lock {self.path} ({reason})")
      try:
        self.path.unlink()
      except FileNotFoundError:
        pass  # Another run took it over first; try again.
    else:
      raise WorkdirBusy(self._busy_message(self._read()))
    if self._read().get("token") != self._record["token"]:
      raise WorkdirBusy(self._busy_message(self._read()))
    self._thread = threading.Thread(target=self._beat, name="moejax-lock",
                                    daemon=True)
    self._thread.start()

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still this run's."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
      self._thread = None
    self.remove_file()
    self._release_workdir()

  def remove_file(self) -> None:
    """Removes the lock file if it is this run's (safe from any thread)."""
    try:
      if self._record and self._read().get("token") == self._record["token"]:
        self.path.unlink()
    except OSError:
      pass  # A read-only or full disk: the next run finds the pid gone.

  def _release_workdir(self) -> None:
    """Removes the workdir this lock created if the run left nothing in it."""
    if self._created_workdir:
      try:
        if not any(self.workdir.iterdir()):
          self.workdir.rmdir()
      except OSError:
        pass

  def _unwritable(self, error: OSError) -> StorageError:
    return storage_error("the lock file", self.path, error,
                         fix="point --workdir at a writable directory")

  def _create(self) -> bool:
    """Creates the lock file with this run's record; False if one exists."""
    text = json.dumps(self._record)
    try:
      if is_local(self.path):
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
          f.write(text)
      elif self.path.exists():
        return False
      else:
        self.path.write_text(text)
    except FileExistsError:
      return False
    except OSError as e:
      raise self._unwritable(e) from None
    return True

  def _read(self) -> dict[str, Any]:
    try:
      record = json.loads(self.path.read_text())
      return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
      return {}

  def _stale(self, holder: dict[str, Any]) -> str | None:
    """Why `holder`'s lock is stale, or None if its run may be alive."""
    if not holder.get("pid"):
      try:
        age = time.time() - self.path.stat().mtime
      except OSError:
        return "it is gone"
      return (f"unreadable, {age:.0f} s old" if age > _UNREADABLE_GRACE_S
              else None)
    pid = int(holder["pid"])
    if holder.get("host") == socket.gethostname():
      if not _pid_alive(pid):
        return f"pid {pid} is no longer running"
      ticks = holder.get("start_ticks")
      if ticks is not None and _start_ticks(pid) not in (None, ticks):
        return f"pid {pid} now belongs to another process"
      return None
    age = time.time() - float(holder.get("heartbeat", 0))
    if age > self.stale_after_s:
      return f"no heartbeat from {holder.get('host')} for {age / 60:.0f} min"
    return None

  def _busy_message(self, holder: dict[str, Any]) -> str:
    who = (f"pid {holder.get('pid')} on {holder.get('host')} (since "
           f"{holder.get('started')})" if holder else "another run")
    return (f"workdir {self.workdir} is in use by {who}; wait for that run to end "
            f"or stop it, or use another --workdir (a lock left by a run that "
            f"died is taken over automatically)")

  def _beat(self) -> None:
    tmp = self.path.parent / f".{LOCK_FILE}.{self._record['token']}"
    while not self._stop.wait(self.heartbeat_s):
      self._record["heartbeat"] = time.time()
      try:
        tmp.write_text(json.dumps(self._record))
        tmp.replace(self.path)  # Atomic: a reader never sees half a record.
      except OSError:  # A full disk is reported by the run's own writes.
        try:
          tmp.unlink()
        except OSError:
          pass
