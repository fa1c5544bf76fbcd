"""Launches N processes of the real CLI on localhost as one multi-process JAX run.

Each process gets `JAX_COORDINATOR_ADDRESS=localhost:<free port>`,
`JAX_NUM_PROCESSES=N`, `JAX_PROCESS_ID=i` and `devices` simulated CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=<devices>`), runs in its own
process group with its output in `<root>/<name>.p<i>.log`, and has its writes
under `root` recorded (`tests.multihost.audit`). Nothing can hang the suite:
`wait` kills every process group when the deadline passes, and `kill` sends
SIGKILL to all of them (a host failure, as a test wants it).
"""

import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

from tests.multihost import audit

REPO = pathlib.Path(__file__).resolve().parents[2]
CLI = ("-m", "tests.multihost.audited_cli")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _xla_flags(devices: int) -> str:
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])


@dataclasses.dataclass
class Result:
  """What one process did: exit code, output, and its writes under the root."""
  index: int
  returncode: int
  output: str
  writes: list[tuple[str, str]]

  def lines(self) -> list[str]:
    return [line for line in self.output.splitlines()
            if not line.startswith("[Gloo]")]


class Launch:
  """N processes of `moejax-train <args>`, started at once."""

  def __init__(self, args: list[str], *, root: pathlib.Path, name: str,
               num_processes: int = 2, devices: int = 4,
               env: dict[str, str] | None = None, cli: tuple[str, ...] = CLI):
    self.root, self.name, self.n = pathlib.Path(root), name, num_processes
    port = free_port()
    base = {**os.environ, **(env or {})}
    base["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p])
    base.update(JAX_PLATFORMS="cpu", XLA_FLAGS=_xla_flags(devices),
                JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                JAX_NUM_PROCESSES=str(num_processes),
                MOEJAX_AUDIT_PREFIX=str(self.root))
    self._procs, self._logs = [], []
    for i in range(num_processes):
      log = self.root / f"{name}.p{i}.log"
      audit_log = self.root / f"{name}.p{i}.writes"
      audit_log.unlink(missing_ok=True)
      env_i = {**base, "JAX_PROCESS_ID": str(i), "MOEJAX_AUDIT_LOG": str(audit_log)}
      with open(log, "w") as out:
        self._procs.append(subprocess.Popen(
            [sys.executable, *cli, *args], cwd=REPO, env=env_i, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True))
      self._logs.append((log, audit_log))

  def running(self) -> bool:
    return any(p.poll() is None for p in self._procs)

  def kill(self) -> None:
    """SIGKILL to every process group (no-op for those already gone)."""
    for p in self._procs:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    for p in self._procs:
      p.wait()

  def wait_for(self, condition, timeout: float, interval: float = 0.02) -> bool:
    """Polls `condition()` while the processes run: True once it holds, False
    if they all ended first; past `timeout` seconds kills them all and fails."""
    deadline = time.monotonic() + timeout
    while not condition():
      if not self.running():
        return condition()
      if time.monotonic() > deadline:
        self.kill()
        raise AssertionError(f"{self.name}: condition not met after "
                             f"{timeout:.0f} s, killed\n{self.report()}")
      time.sleep(interval)
    return True

  def wait(self, timeout: float) -> list[Result]:
    """Waits for every process; past `timeout` seconds kills them all and fails."""
    deadline = time.monotonic() + timeout
    try:
      for p in self._procs:
        p.wait(max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
      self.kill()
      raise AssertionError(f"{self.name}: still running after {timeout:.0f} s, "
                           f"killed\n{self.report()}") from None
    return self.results()

  def results(self) -> list[Result]:
    return [Result(i, p.returncode, log.read_text(errors="replace"),
                   audit.read(str(audit_log)))
            for i, (p, (log, audit_log)) in enumerate(zip(self._procs, self._logs))]

  def report(self) -> str:
    """The last lines of every process's output (for failure messages)."""
    parts = []
    for i, (log, _) in enumerate(self._logs):
      text = log.read_text(errors="replace") if log.exists() else ""
      tail = [ln for ln in text.splitlines() if not ln.startswith("[Gloo]")][-25:]
      parts.append(f"--- process {i} ---\n" + "\n".join(tail))
    return "\n".join(parts)


def run(args: list[str], *, root: pathlib.Path, name: str, timeout: float = 300,
        check: bool = True, **kwargs) -> list[Result]:
  """Launches, waits (killing everything past `timeout`), and with `check`
  asserts that every process exited 0."""
  launch = Launch(args, root=root, name=name, **kwargs)
  results = launch.wait(timeout)
  if check and any(r.returncode for r in results):
    raise AssertionError(f"{name}: exit codes {[r.returncode for r in results]}\n"
                         f"{launch.report()}")
  return results
