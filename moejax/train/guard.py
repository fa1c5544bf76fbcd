"""What a run is entered with: the workdir lock, stop signals, quiet failures.

`with guarded_run(workdir) as signals:` around everything a run writes:
- `WorkdirLock`: one run per workdir (process 0 holds it; every process stops
  with one line when it cannot be taken);
- `StopSignals`: SIGTERM/SIGINT stop the run at a step boundary
  (`signals.should_stop(step)`);
- orbax's own logs of a failed save or restore, and the "Event loop is closed"
  and "Future exception was never retrieved" noise its thread pools print
  after one, are silenced: the run reports the failure itself in one line
  (after a failed run they stay silenced: orbax's threads may still log).
  `--verbosity=0` (absl INFO) shows them again.
"""

import contextlib
import logging
import os
import sys
from typing import Iterator

import jax
from absl import logging as absl_logging

from moejax.errors import MoejaxError, WorkdirBusy
from moejax.parallel import hosts
from moejax.train.lock import WorkdirLock
from moejax.train.preemption import StopSignals


class _OrbaxQuiet(logging.Filter):
  """Drops orbax's log records, and asyncio's 'Future exception was never
  retrieved' for the writes of a failed save, unless absl logs at INFO or
  more."""

  def filter(self, record: logging.LogRecord) -> bool:
    if absl_logging.get_verbosity() >= absl_logging.INFO:
      return True
    if record.name == "asyncio":
      return "never retrieved" not in str(record.msg)
    return f"{os.sep}orbax{os.sep}" not in record.pathname


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
  """Silences orbax's logs of a failure the run reports itself, and the
  'Event loop is closed' noise after one."""
  quiet = _OrbaxQuiet()
  loggers = [logging.getLogger("absl"), logging.getLogger("asyncio")]
  previous_unraisable = sys.unraisablehook

  def unraisable_hook(args):
    # orbax/tensorstore callbacks that fire after a failed read or write find
    # their event loop closed; the failure itself is reported.
    if not (isinstance(args.exc_value, RuntimeError)
            and "Event loop is closed" in str(args.exc_value)):
      previous_unraisable(args)

  for logger in loggers:
    logger.addFilter(quiet)
  sys.unraisablehook = unraisable_hook
  # Not in a `finally`: a failed run keeps them quiet, as orbax's writer
  # threads of a failed save may log their failure after the run reported it.
  yield
  sys.unraisablehook = previous_unraisable
  for logger in loggers:
    logger.removeFilter(quiet)


@contextlib.contextmanager
def _process0_lock(workdir: str | os.PathLike
                   ) -> Iterator[WorkdirLock | None]:
  """The workdir lock, taken by process 0; every process fails together."""
  if jax.process_count() == 1:
    with WorkdirLock(workdir) as lock:
      yield lock
    return
  lock, failure = None, None
  if hosts.is_writer():
    try:
      lock = WorkdirLock(workdir)
      lock.acquire()
    except MoejaxError as e:
      lock, failure = None, e
  locked = hosts.all_processes(failure is None)  # Only process 0 can fail.
  if failure is not None:
    raise failure
  if not locked:
    raise WorkdirBusy(f"process 0 could not lock workdir {workdir}; see its "
                      "message")
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()


@contextlib.contextmanager
def guarded_run(workdir: str | os.PathLike) -> Iterator[StopSignals]:
  """Locks `workdir`, handles stop signals and quiets orbax's failure logs for
  the length of a run (see the module docstring)."""
  with _quiet_orbax(), _process0_lock(workdir) as lock, StopSignals(
      on_abort=lock.remove_file if lock else None) as signals:
    yield signals
