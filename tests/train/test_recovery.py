"""Damaged checkpoints fall back to older ones, logs with a cut line are
repaired, and the workdir lock tells live runs from dead ones."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from moejax.errors import CheckpointError, WorkdirBusy
from moejax.metrics.writers import MetricWriter, read_metrics, repair_jsonl
from moejax.train import parse, train_and_evaluate
from moejax.train.lock import LOCK_FILE, WorkdirLock
from tests.train.conftest import assert_same_curve, fault_config


def _tree(path) -> dict[str, bytes]:
  return {str(p.relative_to(path)): p.read_bytes()
          for p in sorted(path.rglob("*")) if p.is_file()}


def _largest_array_file(step_dir):
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file()
           and "ocdbt.process_" in str(p) and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


def test_damaged_checkpoints_move_aside_and_the_resume_reproduces_the_curve(
    new_workdir, straight, capfd):
  config = fault_config(train__checkpoint_every=10, train__keep_checkpoints=4)
  workdir = new_workdir()
  train_and_evaluate(parse(config), workdir, verbose=False)
  # Rewind to a run stopped at step 50 (checkpoints 30, 40, 50) ...
  stage = workdir / "checkpoints" / "stage_0"
  shutil.rmtree(stage / "60")
  # ... whose step-50 checkpoint has an array file cut to half, and whose
  # step-40 one has garbage for its data position.
  array = _largest_array_file(stage / "50")
  array.write_bytes(array.read_bytes()[:array.stat().st_size // 2])
  (stage / "40" / "data" / "metadata").write_text("garbage")
  damaged = {step: _tree(stage / str(step)) for step in (40, 50)}

  capfd.readouterr()
  train_and_evaluate(parse(config), workdir, verbose=False)
  warnings = capfd.readouterr().err.strip().splitlines()
  assert len(warnings) == 2, warnings
  assert re.fullmatch(
      rf"moejax: warning: checkpoint {stage}/50 is damaged \(OUT_OF_RANGE: "
      rf"Error reading .+\); moved it to {stage}/corrupt-50 and resuming from "
      r"the one before it", warnings[0]), warnings[0]
  assert re.fullmatch(
      rf"moejax: warning: checkpoint {stage}/40 is damaged \(data position: "
      r"JSONDecodeError: .+\); moved it to "
      rf"{stage}/corrupt-40 and resuming from the one before it",
      warnings[1]), warnings[1]
  for step, files in damaged.items():  # Moved, never changed or deleted.
    assert _tree(stage / f"corrupt-{step}") == files
  # Resumed from step 30: the rows it wrote after 30 moved aside, the rest
  # is the uninterrupted curve.
  assert min(r["step"] for r in read_metrics(
      workdir, "metrics.discarded.jsonl")) == 31
  assert_same_curve(workdir, straight)


def test_a_checkpoint_of_another_model_is_a_mismatch_and_nothing_moves(
    new_workdir, tiny):
  workdir = new_workdir()
  train_and_evaluate(parse(tiny(train__steps=5, train__checkpoint_every=5)),
                     workdir, verbose=False)
  # The same config now builds 8 experts (as after a code change): the saved
  # tree has other shapes, which is not damage.
  config = json.loads((workdir / "config.json").read_text())
  config["model"]["moe"]["num_experts"] = 8
  for stage in config["stages"]:
    stage["model"]["moe"]["num_experts"] = 8
  (workdir / "config.json").write_text(json.dumps(config))
  before = _tree(workdir / "checkpoints")
  with pytest.raises(CheckpointError, match=(
      r"checkpoint 5 in \S+ does not match this model \(\d+ arrays differ, "
      r"e\.g\. .+: saved \(\(.*4.*\), 'float32'\), model \(\(.*8.*\), "
      r"'float32'\)\); use a new --workdir or the config that wrote it")):
    train_and_evaluate(parse(tiny(train__steps=5, model__num_experts=8)),
                       workdir, verbose=False)
  assert _tree(workdir / "checkpoints") == before


def test_a_cut_last_line_is_moved_aside_on_open(tmp_path, capfd):
  rows = [{"step": 5, "train/loss": 2.5}, {"step": 10, "train/loss": 2.0}]
  text = "".join(json.dumps(r) + "\n" for r in rows)
  (tmp_path / "metrics.jsonl").write_text(text + '{"step": 15, "train/lo')
  # A complete row whose newline was cut is kept.
  (tmp_path / "router_loads.jsonl").write_text(json.dumps(rows[0]))
  writer = MetricWriter(tmp_path, tensorboard=False)
  warning = capfd.readouterr().err.strip().splitlines()
  assert warning == [f"moejax: warning: {tmp_path}/metrics.jsonl held 1 "
                     "incomplete line(s) (a write cut short); moved to "
                     "metrics.discarded.jsonl"]
  assert read_metrics(tmp_path) == rows
  assert read_metrics(tmp_path, "router_loads.jsonl") == rows[:1]
  assert (tmp_path / "router_loads.jsonl").read_text().endswith("\n")
  assert read_metrics(tmp_path, "metrics.discarded.jsonl") == [
      {"discarded_line": '{"step": 15, "train/lo'}]
  writer.write(15, {"train/loss": 1.5})
  writer.truncate_after(10)  # Works on the repaired log.
  assert read_metrics(tmp_path) == rows
  assert repair_jsonl(tmp_path / "metrics.jsonl") == 0  # Nothing left to do.


def _write_lock(workdir, **record):
  (workdir / LOCK_FILE).write_text(json.dumps(record))


def test_a_live_run_holds_the_lock(tmp_path):
  with WorkdirLock(tmp_path / "run") as lock:
    record = json.loads(lock.path.read_text())
    assert record["pid"] == os.getpid()
    assert record["host"] == socket.gethostname()
    with pytest.raises(WorkdirBusy, match=rf"in use by pid {os.getpid()} on "):
      WorkdirLock(tmp_path / "run").acquire()
  assert not (tmp_path / "run" / LOCK_FILE).exists()
  WorkdirLock(tmp_path / "run").acquire()  # Free again.


def test_heartbeat_advances(tmp_path):
  with WorkdirLock(tmp_path, heartbeat_s=0.05) as lock:
    first = json.loads(lock.path.read_text())["heartbeat"]
    time.sleep(0.5)
    assert json.loads(lock.path.read_text())["heartbeat"] > first


def _dead_pid() -> int:
  proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  return int(proc.stdout)


@pytest.mark.parametrize("holder,reason", [
    (lambda: {"host": socket.gethostname(), "pid": _dead_pid()},
     r"pid \d+ is no longer running"),
    (lambda: {"host": socket.gethostname(), "pid": os.getpid(),
              "start_ticks": -1},
     r"pid \d+ now belongs to another process"),
    (lambda: {"host": "elsewhere", "pid": 1, "heartbeat": time.time() - 3600},
     "no heartbeat from elsewhere for 60 min"),
], ids=["dead pid", "reused pid", "silent host"])
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, capfd, holder,
                                                   reason):
  _write_lock(tmp_path, **holder())
  with WorkdirLock(tmp_path) as lock:
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
  assert re.fullmatch(
      rf"moejax: warning: took over the stale lock {tmp_path}/run.lock "
      rf"\({reason}\)", capfd.readouterr().err.strip())


def test_another_hosts_fresh_lock_and_a_lock_being_written_are_busy(tmp_path):
  _write_lock(tmp_path, host="elsewhere", pid=1, heartbeat=time.time(),
              started="2026-01-01 00:00:00")
  with pytest.raises(WorkdirBusy, match="in use by pid 1 on elsewhere"):
    WorkdirLock(tmp_path).acquire()
  (tmp_path / LOCK_FILE).write_text("")  # Just created by another run.
  with pytest.raises(WorkdirBusy):
    WorkdirLock(tmp_path).acquire()
  old = time.time() - 3600  # ... or left by one killed while creating it.
  os.utime(tmp_path / LOCK_FILE, (old, old))
  WorkdirLock(tmp_path).acquire()
