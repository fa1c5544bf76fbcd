"""Stop requests: SIGTERM and SIGINT end a run at a step boundary, every process
at the same step.

While `StopSignals` is entered (in the main thread):
- SIGTERM (a cloud's preemption notice) or SIGINT (Ctrl-C) only asks the run to
  stop: the loop calls `should_stop(step)` after every step, saves a checkpoint
  and raises `Interrupted` (exit code 0 after SIGTERM, 130 after SIGINT);
- a second SIGINT exits at once (code 130) without saving. A watcher thread
  reads the signal numbers that `signal.set_wakeup_fd` writes as each signal
  arrives, so this works even while the main thread is inside a long XLA call
  (compilation), where Python signal handlers do not run.

Multi-process runs must all stop after the same step, or the checkpoint would
mix steps. moejax uses jax's preemption sync point: a SIGTERM on any process is
posted to the coordination service, each process reports its step, and
`reached_preemption_sync_point(step)` returns True on every process at the same
step (one past the fastest one's). Why this rather than an all-reduce of a stop
flag at each step boundary: it costs nothing per step (no collective, and no
host sync that would stop the host from dispatching steps ahead of the device),
it is what orbax's preemption support calls, and it catches the notice wherever
it lands. jax owns SIGTERM for this (its handler is installed by
`jax.distributed.initialize`), so moejax leaves SIGTERM alone there and forwards
a first SIGINT to jax as a SIGTERM of its own process. With jax's preemption
service turned off (`jax_enable_preemption_service=False`), processes all-gather
their stop flags at every step instead.
"""

import os
import signal
import sys
import threading
from typing import Callable

import jax
from jax.experimental import multihost_utils

from moejax.parallel import hosts

SIGINT_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for Ctrl-C.
_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


class StopSignals:
  """Context manager: SIGTERM/SIGINT request a stop at the next step boundary.

  Outside the main thread (where Python cannot install signal handlers) it
  does nothing and `should_stop` is always False.
  """

  def __init__(self, on_abort: Callable[[], None] | None = None):
    """`on_abort` runs (in the watcher thread) just before a second SIGINT
    exits the process."""
    self.received: int | None = None  # The first stop signal of this process.
    self._on_abort = on_abort
    self._interrupts = 0
    self._mode = "off"
    self._previous: dict[int, object] = {}
    self._old_wakeup_fd = -1
    self._pipe: tuple[int, int] | None = None
    self._watcher: threading.Thread | None = None

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is not threading.main_thread():
      return self
    if jax.process_count() == 1:
      self._mode = "local"
    elif jax.config.jax_enable_preemption_service:
      self._mode = "jax"
    else:
      self._mode = "allgather"
    handled = ([signal.SIGINT] if self._mode == "jax"
               else [signal.SIGTERM, signal.SIGINT])
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    self._pipe = (read_fd, write_fd)
    self._previous = {s: signal.signal(s, _ignore) for s in handled}
    self._old_wakeup_fd = signal.set_wakeup_fd(write_fd,
                                               warn_on_full_buffer=False)
    self._watcher = threading.Thread(target=self._watch, args=(read_fd,),
                                     name="moejax-signals", daemon=True)
    self._watcher.start()
    return self

  def __exit__(self, *exc) -> None:
    if self._pipe is None:
      return
    signal.set_wakeup_fd(self._old_wakeup_fd)
    for signum, handler in self._previous.items():
      # None: a handler installed outside Python, which cannot be put back.
      signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    os.close(self._pipe[1])  # The watcher's read returns b"" and it ends.
    self._watcher.join(timeout=5)
    os.close(self._pipe[0])
    self._pipe = None

  def should_stop(self, step: int) -> bool:
    """True when the run must stop after `step`; the same on every process.

    Call it after every step, with the global step just completed.
    """
    if self._mode == "jax":
      return multihost_utils.reached_preemption_sync_point(step)
    if self._mode == "allgather":
      return not hosts.all_processes(self.received is None)
    return self.received is not None

  @property
  def exit_code(self) -> int:
    """130 if this process got SIGINT, else 0 (SIGTERM, or another process's
    notice)."""
    return SIGINT_EXIT_CODE if self._interrupts else 0

  def describe(self) -> str:
    """What stopped the run, for its one line."""
    if self.received is not None:
      return _NAMES[self.received]
    if self._mode == "allgather":
      return "a stop signal to another process"
    return "a preemption notice (SIGTERM to one of the processes)"

  def _watch(self, read_fd: int) -> None:
    while True:
      try:
        data = os.read(read_fd, 64)
      except OSError:
        return
      if not data:
        return
      for signum in data:
        self._on_signal(signum)

  def _on_signal(self, signum: int) -> None:
    if signum == signal.SIGINT:
      self._interrupts += 1
      if self._interrupts > 1:
        sys.stderr.write("moejax: interrupted twice: exited at once without "
                         "saving; the last checkpoint is kept\n")
        sys.stderr.flush()
        if self._on_abort is not None:
          self._on_abort()
        os._exit(SIGINT_EXIT_CODE)  # pylint: disable=protected-access
    if self.received is None and signum in _NAMES:
      self.received = signum
      if self._mode == "jax" and signum == signal.SIGINT:
        os.kill(os.getpid(), signal.SIGTERM)  # Post it through jax's notifier.


def _ignore(signum, frame) -> None:
  """The Python-level handler: the watcher thread does the work."""
  del signum, frame
