"""Real signals to a real `moejax-train`: SIGTERM and SIGINT save and exit, a
second SIGINT exits at once, two processes stop at the same step, a kill -9
before the first checkpoint leaves no duplicate rows, one run per workdir."""

import json
import re
import signal
import time

import pytest

from moejax.metrics.writers import read_metrics
from moejax.train import parse, train_and_evaluate
from tests.train.conftest import FAULT_STEPS, assert_same_curve, fault_config
from tests.train.faults import CliRun, launch_processes

_STOPPED = re.compile(
    r"moejax: stopped by (?P<by>.+) after step (?P<step>\d+) of 60 \(stage 0, "
    r"train\); checkpoint saved in (?P<dir>\S+); resume with: moejax-train "
    r"--config \S+ --workdir \S+")


def _one_line(stderr: str) -> str:
  lines = stderr.strip().splitlines()
  assert len(lines) == 1, stderr
  return lines[0]


def _assert_stopped_cleanly(workdir, line: str, by: str) -> int:
  """The stop line names a step whose checkpoint holds that step's data
  position, no row past it, and the lock is gone; returns the step."""
  match = _STOPPED.fullmatch(line)
  assert match and match["by"] == by, line
  step = int(match["step"])
  assert 5 <= step < FAULT_STEPS
  saved = workdir / "checkpoints" / "stage_0" / str(step)
  assert match["dir"] == str(saved)
  # The data position saved with the state: batch `step` is the next one.
  assert json.loads((saved / "data" / "metadata").read_text()) == {
      "next_batch": step}
  # A row for every step up to the stop (log_every=1), none after it.
  steps = [r["step"] for r in read_metrics(workdir) if "train/loss" in r]
  assert steps == list(range(1, step + 1))
  assert not (workdir / "run.lock").exists()
  return step


def _args(config_file, workdir) -> list[str]:
  return ["--config", str(config_file), "--workdir", str(workdir)]


def test_sigterm_saves_exits_0_and_the_resume_reproduces_the_curve(
    new_workdir, fault_config_file, straight):
  workdir = new_workdir()
  run = CliRun(_args(fault_config_file, workdir))
  run.wait_for("step      5 |")
  run.send(signal.SIGSTOP)  # Frozen, alive: it holds the workdir.
  try:
    code, _, stderr = CliRun(_args(fault_config_file, workdir)).finish(300)
  finally:
    run.send(signal.SIGTERM)
    run.send(signal.SIGCONT)
  assert code == 1
  assert re.fullmatch(
      rf"moejax: error: workdir {workdir} is in use by pid {run.proc.pid} on "
      r"\S+ \(since [-\d: ]+\); wait for that run to end or stop it, or use "
      r"another --workdir .*", _one_line(stderr)), stderr

  code, _, stderr = run.finish(300)
  assert code == 0, stderr
  _assert_stopped_cleanly(workdir, _one_line(stderr), "SIGTERM")
  train_and_evaluate(parse(fault_config()), workdir, verbose=False)
  assert_same_curve(workdir, straight)


def test_sigint_saves_and_exits_130(new_workdir, fault_config_file):
  workdir = new_workdir()
  run = CliRun(_args(fault_config_file, workdir))
  run.wait_for("step      5 |")
  run.send(signal.SIGINT)
  code, _, stderr = run.finish(300)
  assert code == 130, stderr
  _assert_stopped_cleanly(workdir, _one_line(stderr), "SIGINT")


def test_second_sigint_exits_at_once_without_saving(new_workdir,
                                                    fault_config_file):
  workdir = new_workdir()
  run = CliRun(_args(fault_config_file, workdir))
  run.wait_for("data ")  # Data loaded; the model is being built and compiled.
  run.send(signal.SIGINT)
  time.sleep(0.05)  # Two signals, not one merged pending one.
  run.send(signal.SIGINT)
  code, lines, stderr = run.finish(120)
  assert code == 130
  assert _one_line(stderr) == ("moejax: interrupted twice: exited at once "
                               "without saving; the last checkpoint is kept")
  assert not [line for line in lines if line.startswith("step")]
  assert not (workdir / "checkpoints").exists() or not any(
      (workdir / "checkpoints").rglob("_CHECKPOINT_METADATA"))
  assert not (workdir / "run.lock").exists()


@pytest.mark.parametrize("preemption_service", ["true", "false"],
                         ids=["jax sync point", "all-gathered flags"])
def test_two_processes_stop_at_the_same_step(new_workdir, fault_config_file,
                                             preemption_service):
  workdir = new_workdir()
  runs = launch_processes(2, _args(fault_config_file, workdir),
                          JAX_ENABLE_PREEMPTION_SERVICE=preemption_service)
  try:
    runs[0].wait_for("step      5 |")
    runs[1].send(signal.SIGTERM)  # A preemption notice to one host only.
  finally:
    results = [run.finish(300) for run in runs]
  steps = []
  for code, _, stderr in results:
    assert code == 0, stderr
    line = _one_line("\n".join(l for l in stderr.splitlines()
                               if "preemption_notifier" not in l))
    match = _STOPPED.fullmatch(line)
    assert match, line
    steps.append(int(match["step"]))
  assert steps[0] == steps[1]
  if preemption_service == "false":  # Each process knows its own signal.
    assert [_STOPPED.fullmatch(_one_line(r[2]))["by"] for r in results] == [
        "a stop signal to another process", "SIGTERM"]
  _assert_stopped_cleanly(workdir, line, match["by"])


def test_kill_before_the_first_checkpoint_leaves_no_duplicate_rows(
    new_workdir, fault_config_file, straight, capfd):
  workdir = new_workdir()
  run = CliRun(_args(fault_config_file, workdir))
  run.wait_for("step      5 |")
  run.send(signal.SIGKILL)
  run.finish(60)
  logged = [r["step"] for r in read_metrics(workdir)]
  assert logged and max(logged) < 20
  assert not list((workdir / "checkpoints").glob("stage_0/[0-9]*"))
  assert (workdir / "run.lock").exists()  # Left by the killed run.

  capfd.readouterr()
  train_and_evaluate(parse(fault_config()), workdir, verbose=False)
  warning = _one_line(capfd.readouterr().err)
  assert re.fullmatch(rf"moejax: warning: took over the stale lock "
                      rf"{workdir}/run.lock \(pid {run.proc.pid} is no longer "
                      r"running\)", warning), warning
  assert_same_curve(workdir, straight)
  discarded = read_metrics(workdir, "metrics.discarded.jsonl")
  assert [r["step"] for r in discarded] == logged
