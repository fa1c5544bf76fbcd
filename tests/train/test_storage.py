"""A disk that fills up, and a workdir that cannot be written: one line, a
non-zero exit, no temporary checkpoint left, the last good checkpoint kept.

The full disk is a real one: a small tmpfs mounted in a user+mount namespace
where the sandbox allows it, else a per-file size limit (RLIMIT_FSIZE; writes
past it fail with EFBIG). `FullDisk.kind` says which ran.
"""

import os
import re
import shlex

import pytest

from moejax.metrics.writers import read_metrics
from moejax.train import parse, train_and_evaluate
from tests.conftest import checkpoint_params
from tests.train.conftest import assert_same_curve, fault_config
from tests.train.faults import (CLI, CliRun, FullDisk, can_mount_tmpfs,
                                disk_size, write_config)

_FULL = r"(No space left on device|File too large) \(\d+(\.\d)? (B|KiB|MiB) free\)"


@pytest.fixture(scope="module")
def full_disk() -> FullDisk:
  return FullDisk()


def _one_line(stderr: str) -> str:
  lines = stderr.strip().splitlines()
  assert len(lines) == 1, stderr
  return lines[0]


def _saved_steps(workdir) -> list[int]:
  stage = workdir / "checkpoints" / "stage_0"
  return sorted(int(p.name) for p in stage.iterdir() if p.name.isdigit())


def test_disk_full_while_saving_a_checkpoint(new_workdir, prepared, tmp_path,
                                             fault_config_file, full_disk,
                                             straight):
  workdir = new_workdir()
  # Room for the data, the logs and one checkpoint (~1.2 MB), not two.
  code, stderr = full_disk.run(
      ["--config", str(fault_config_file)], workdir, tmp_path / "out",
      tmpfs_bytes=disk_size(prepared) + 1_900_000, file_limit=150_000)
  out = tmp_path / "out"
  assert code == 1, stderr
  line = _one_line(stderr)
  match = re.fullmatch(
      rf"moejax: error: cannot write checkpoint step (?P<step>\d+) to "
      rf"\S+/checkpoints/stage_0: {_FULL}; (the last good checkpoint \(step "
      r"(?P<kept>\d+)\) is kept|no checkpoint of this stage was written); free "
      r"space and run the same command to resume", line)
  saved = _saved_steps(out)
  if match is None:
    # When the step-40 save squeezes in (how full the disk is at each step
    # depends on when the async writes land), the next write to fail can be
    # a probe or a metrics row: also one line, the checkpoints kept.
    assert re.fullmatch(
        rf"moejax: error: cannot write .+: {_FULL}; free space and run the "
        r"same command to resume", line), line
    assert saved, "no checkpoint kept"
  elif full_disk.kind == "tmpfs":
    # Room for about one checkpoint: the save after the kept one fails
    # (usually step 40 with 20 kept; 60 with 40 when 40 squeezed in), and the
    # kept one is the newest on disk.
    step, kept = int(match["step"]), int(match["kept"])
    assert (step - kept, max(saved)) == (20, kept) and step in (40, 60), line
  assert not list(out.rglob("*.orbax-checkpoint-tmp*"))
  for step in saved:  # Intact: it restores.
    assert checkpoint_params(out, 0, step)
  # On a disk with room, the same command resumes and gives the same curve.
  train_and_evaluate(parse(fault_config()), out, verbose=False)
  assert_same_curve(out, straight)


def test_disk_full_while_writing_metrics(new_workdir, prepared, tmp_path,
                                         full_disk, straight, capfd):
  config = fault_config(train__checkpoint_every=1000)  # Only the last step.
  config_file = write_config(tmp_path / "metrics_full.py", config)
  workdir = new_workdir()
  code, stderr = full_disk.run(
      ["--config", str(config_file)], workdir, tmp_path / "out",
      tmpfs_bytes=disk_size(prepared) + 48 * 1024, file_limit=40_000)
  out = tmp_path / "out"
  assert code == 1, stderr
  assert re.fullmatch(rf"moejax: error: cannot write .+: {_FULL}; free space "
                      r"and run the same command to resume",
                      _one_line(stderr)), stderr
  assert not (out / "checkpoints" / "stage_0").exists() or not _saved_steps(out)

  capfd.readouterr()
  train_and_evaluate(parse(config), out, verbose=False)
  # Whatever the full disk cut short was moved aside; the rerun from step 0
  # has one row per step, the uninterrupted curve.
  for line in capfd.readouterr().err.strip().splitlines():
    assert re.fullmatch(r"moejax: warning: (\S+ held 1 incomplete line\(s\) .*"
                        r"|took over the stale lock .*)", line), line
  assert_same_curve(out, straight, keys=("train/loss", "train/aux_loss"))
  assert read_metrics(out, "metrics.discarded.jsonl")


def test_read_only_workdir_is_one_line_and_untouched(tmp_path,
                                                     fault_config_file):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine")
  args = [*CLI, "--config", str(fault_config_file), "--workdir", str(workdir)]
  if os.geteuid() != 0:
    workdir.chmod(0o555)
    command = args
  elif can_mount_tmpfs():  # Root writes anywhere: mount it read-only.
    command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
               f"mount --bind {workdir} {workdir} && mount -o remount,bind,ro "
               f"{workdir} {workdir} && exec {shlex.join(args)}"]
  else:
    pytest.skip("running as root without mount namespaces")
  try:
    code, lines, stderr = CliRun([], command=command).finish(300)
  finally:
    workdir.chmod(0o755)
  assert code == 1
  assert _one_line(stderr) == (
      f"moejax: error: cannot write the lock file {workdir}/run.lock: "
      "Read-only file system; point --workdir at a writable directory"
      if os.geteuid() == 0 else
      f"moejax: error: cannot write the lock file {workdir}/run.lock: "
      "Permission denied; point --workdir at a writable directory")
  assert not lines
  assert [p.name for p in workdir.iterdir()] == ["notes.txt"]
  assert (workdir / "notes.txt").read_text() == "mine"
