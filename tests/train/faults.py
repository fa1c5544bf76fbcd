"""Real faults for tests: `moejax-train` as a subprocess, real signals, a full
disk, several processes joined by jax.distributed.

The CLI runs `python -m moejax.train` with this checkout on PYTHONPATH. Its
config is a file written by `write_config` from a ConfigDict (built from
`default_config()`, so the subprocess never imports tests/conftest.py, which
would set its device count).
"""

import os
import pathlib
import queue
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import ml_collections

from tests.multihost.launch import free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "moejax.train"]


def _flatten(tree: dict, prefix: tuple = ()) -> list[tuple[tuple, object]]:
  out = []
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out += _flatten(value, prefix + (key,))
    else:
      out.append((prefix + (key,), value))
  return out


def write_config(path: pathlib.Path, config: ml_collections.ConfigDict
                 ) -> pathlib.Path:
  """A `configs/*.py`-style file whose `get_config()` returns `config`."""
  lines = ["from moejax.train.config import default_config", "",
           "def get_config():", "  c = default_config()"]
  for key, value in _flatten(config.to_dict()):
    lines.append(f"  c{''.join(f'[{k!r}]' for k in key)} = {value!r}")
  lines.append("  return c")
  path.write_text("\n".join(lines) + "\n")
  return path


def cli_env(**extra: str) -> dict[str, str]:
  """The environment of a CLI subprocess: this checkout, CPU, and a shared
  compilation cache so each run does not compile the same programs again."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(),
                                                    "moejax-test-jax-cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.update(extra)
  return env


class CliRun:
  """A running `moejax-train`: its stdout lines as they come, and a hard
  timeout (it is killed when `finish` runs out of time)."""

  def __init__(self, args: list[str], *, env: dict[str, str] | None = None,
               preexec_fn=None, command: list[str] | None = None):
    self.proc = subprocess.Popen(
        command or [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env or cli_env(), cwd=ROOT, preexec_fn=preexec_fn,
        start_new_session=True)  # Its own group: a timeout kills it all.
    self.lines: list[str] = []
    self._queue: queue.Queue = queue.Queue()
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self) -> None:
    for line in self.proc.stdout:
      self.lines.append(line.rstrip("\n"))
      self._queue.put(line)
    self._queue.put(None)

  def wait_for(self, prefix: str, timeout: float = 300) -> str:
    """Blocks until a stdout line starts with `prefix`; returns it."""
    deadline = time.monotonic() + timeout
    while True:
      try:
        line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
      except queue.Empty:
        line = None
      if line is None:
        self.kill()
        raise AssertionError(f"no line starting with {prefix!r}; stdout: "
                             f"{self.lines[-5:]}, stderr: {self.finish(5)[2]}")
      if line.startswith(prefix):
        return line

  def kill(self) -> None:
    """SIGKILL to the process and every child it started."""
    try:
      os.killpg(self.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass

  def send(self, signum: int) -> None:
    self.proc.send_signal(signum)

  def finish(self, timeout: float = 300) -> tuple[int, list[str], str]:
    """(exit code, stdout lines, stderr); kills the process after `timeout`."""
    try:
      _, stderr = self.proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      _, stderr = self.proc.communicate()
    self._reader.join(timeout=5)
    return self.proc.returncode, self.lines, stderr


def launch_processes(num_processes: int, args: list[str], *,
                     devices_per_process: int = 4, **env: str) -> list[CliRun]:
  """`moejax-train args` as `num_processes` processes on this host joined by
  jax.distributed (a coordinator on a free local port), each with
  `devices_per_process` CPU devices and `env` added to its environment."""
  address = f"127.0.0.1:{free_port()}"
  flags = f"--xla_force_host_platform_device_count={devices_per_process}"
  return [CliRun(args, env=cli_env(
      JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(num_processes),
      JAX_PROCESS_ID=str(i), XLA_FLAGS=flags, **env))
          for i in range(num_processes)]


def can_mount_tmpfs() -> bool:
  """Whether a user+mount namespace may mount a tmpfs here (needs unshare and
  unprivileged user namespaces, or root)."""
  if shutil.which("unshare") is None:
    return False
  with tempfile.TemporaryDirectory() as mnt:
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
         f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(mnt)}"],
        capture_output=True, check=False, timeout=30)
  return probe.returncode == 0


def disk_size(path: pathlib.Path) -> int:
  """Bytes `path` takes on a tmpfs (whole 4 KiB pages per file)."""
  return sum(-(-p.stat().st_size // 4096) * 4096 for p in path.rglob("*")
             if p.is_file())


class FullDisk:
  """Runs the CLI on a filesystem that fills up: a tmpfs of a given size in a
  user+mount namespace where the sandbox allows one, else a per-file size
  limit (RLIMIT_FSIZE: writes past it fail with EFBIG, a real kernel error)."""

  def __init__(self):
    self.kind = "tmpfs" if can_mount_tmpfs() else "rlimit"

  def run(self, args: list[str], workdir: pathlib.Path, out: pathlib.Path, *,
          tmpfs_bytes: int, file_limit: int, timeout: float = 600
          ) -> tuple[int, str]:
    """Runs the CLI on a copy of `workdir` on the full disk; the workdir it
    leaves is copied to `out`. Returns (exit code, stderr)."""
    if self.kind == "rlimit":
      shutil.copytree(workdir, out)

      def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

      run = CliRun([*args, "--workdir", str(out)], preexec_fn=limit)
      code, _, stderr = run.finish(timeout)
      return code, stderr
    mnt = out.parent / f"{out.name}.mnt"
    mnt.mkdir()
    logs = out.parent / f"{out.name}.log"
    cli = shlex.join([*CLI, *args, "--workdir", str(mnt / "run")])
    script = (f"mount -t tmpfs -o size={tmpfs_bytes // 1024}k tmpfs {mnt} || "
              f"exit 99; cp -a {shlex.quote(str(workdir))} {mnt}/run; "
              f"cd {shlex.quote(str(ROOT))}; {cli} 2> {logs}; code=$?; "
              f"cp -a {mnt}/run {shlex.quote(str(out))}; exit $code")
    run = CliRun([], command=["unshare", "--user", "--map-root-user",
                              "--mount", "sh", "-c", script])
    code, _, _ = run.finish(timeout)
    return code, logs.read_text()

