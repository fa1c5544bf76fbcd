"""Two processes of four CPU devices each, launched as docs/running.md launches them.

Every run here is the real CLI in real subprocesses joined by jax.distributed
over localhost (gloo collectives), each with a hard timeout. Checked: a fresh
workdir and a fresh data cache with probes on; results equal to the same run in
one process with 8 devices (loss curve, evaluations, routing fluctuation) on
both meshes; kill -9 of every process, then resume, with params and moments
sharded (mesh.shard_params) against a replicated reference; the two-process
checkpoint restored in one process; upcycling a one-process run's checkpoint
(into scanned blocks with remat and gradient accumulation); the mesh
that leaves a process without devices; a data error on process 0 reaching
every process; and that only process 0 writes the workdir outside orbax's
checkpoints.
"""

import json
import re

import numpy as np
import pytest

from moejax.metrics.writers import read_metrics
from tests.multihost import launch
from tests.multihost.runs import (STABLEMOE, TINY, assert_process0_writes_workdir,
                                  assert_same_run, cli_args, reference)
from tests.data.corpora import write_corpus
from tests.test_readme import DOCS

pytestmark = pytest.mark.multihost
TIMEOUT = 420  # Seconds per launch: compiling on a shared 2-core CI machine.


def readme_pod_command() -> tuple[str, list[str]]:
  """(config, flags) of the documented localhost two-process launch."""
  text = (DOCS / "running.md").read_text()
  section = text[text.index("## Run on a TPU pod or a multi-GPU host"):]
  block = re.search(r"```bash\n(.*?)```", section[section.index(
      "Two processes"):], flags=re.S)[1]
  command = re.search(r"moejax-train (.*?)&", block.replace("\\\n", " "),
                      flags=re.S)[1].split()
  config = command[command.index("--config") + 1]
  return config, [a for a in command if a.startswith("--config.")]


def _done_lines(results) -> list[str]:
  return [ln for r in results for ln in r.lines() if ln.startswith("done: ")]


def test_readme_pod_command_on_a_fresh_workdir_equals_one_process(tmp_path):
  config, readme_flags = readme_pod_command()
  assert config == "configs/stablemoe.py" and readme_flags
  mesh = {f.split("=")[0][len("--config."):]: int(f.split("=")[1])
          for f in readme_flags}
  workdir = tmp_path / "pod"
  # A fresh data cache too: both processes start on nothing prepared.
  results = launch.run(cli_args(config, workdir, STABLEMOE) + readme_flags,
                       root=tmp_path, name="pod", timeout=TIMEOUT,
                       env={"MOEJAX_CACHE_DIR": str(tmp_path / "cache")})
  assert len(_done_lines(results)) == 1  # Only process 0 prints the summary.
  assert_process0_writes_workdir(results, workdir)
  for name in ("config.json", "tokenizer.model", "metrics.jsonl", "probes",
               "fluctuation.json", "fluctuation.png", "checkpoints/stage_1/30"):
    assert (workdir / name).exists(), name

  reference(config, tmp_path / "one", {**STABLEMOE, **mesh})
  assert_same_run(workdir, tmp_path / "one")


def test_killed_with_sigkill_resumes_equal_to_one_process(tmp_path):
  # No expert overflows (capacity is counted per device), so the checkpoint
  # computes the same function on one device too. The two processes keep
  # params and moments sharded (mesh.shard_params); the one-process runs
  # replicate them: the same losses, and the checkpoints restore across.
  overrides = {**STABLEMOE, "mesh.data": 2, "mesh.expert": 4,
               "model.capacity_factor": 8.0}
  workdir = tmp_path / "run"
  args = cli_args("configs/stablemoe.py", workdir,
                  {**overrides, "mesh.shard_params": True})
  first = launch.Launch(args, root=tmp_path, name="killed")
  checkpoint = workdir / "checkpoints" / "stage_1" / "10"  # Stage 1, mid-run.
  try:
    first.wait_for(checkpoint.is_dir, timeout=TIMEOUT)
  finally:
    first.kill()  # SIGKILL to both processes at once.
  assert checkpoint.is_dir(), first.report()
  assert max(r["step"] for r in read_metrics(workdir)) < 30, "finished unkilled"

  results = launch.run(args, root=tmp_path, name="resumed", timeout=TIMEOUT)
  assert "resumed stage 1 (frozen) at step 10" in results[0].output
  assert_process0_writes_workdir(first.results() + results, workdir)
  reference("configs/stablemoe.py", tmp_path / "one", overrides)
  assert_same_run(workdir, tmp_path / "one")

  # The sharded two-process checkpoint restores replicated in one process (8
  # devices, and one): the finished run only evaluates, to the same loss.
  final = read_metrics(workdir)[-1]
  for mesh in ({"mesh.data": 2, "mesh.expert": 4}, {"mesh.data": 1,
                                                    "mesh.expert": 1}):
    again = reference("configs/stablemoe.py", workdir, {**overrides, **mesh})
    np.testing.assert_allclose(again["eval/loss"], final["eval/loss"], rtol=1e-5)


def test_quickstart_on_a_fresh_workdir_with_probes(tmp_path):
  workdir = tmp_path / "quick"
  overrides = {**TINY, "mesh.data": 2, "mesh.expert": 4}
  results = launch.run(cli_args("configs/quickstart.py", workdir, overrides),
                       root=tmp_path, name="quick", timeout=TIMEOUT,
                       env={"MOEJAX_CACHE_DIR": str(tmp_path / "cache")})
  [done] = _done_lines(results)
  assert done.startswith("done: step=30,")
  assert_process0_writes_workdir(results, workdir)
  assert [r["step"] for r in read_metrics(workdir)
          if "router/fluctuation" in r] == [10, 15, 20, 25, 30]


def test_upcycling_another_runs_checkpoint_equals_one_process(tmp_path):
  # The dense run saved from one process with 8 devices; the upcycled run
  # restores it whole on every process of two (train.init_from), into the
  # scanned layout with full remat and 2 accumulated micro-batches of 8,
  # balanced over the whole accumulated batch of both processes (`global`).
  short = {**TINY, "train.steps": 10}
  reference("configs/dense.py", tmp_path / "dense", short)
  config = f"configs/upcycle.py:{tmp_path / 'dense'}"
  overrides = {**short, "mesh.data": 2, "mesh.expert": 4,
               "model.scan_layers": True, "model.remat": "full",
               "train.batch_size": 16, "train.grad_accum_steps": 2,
               "model.router_options.balance": "global"}
  workdir = tmp_path / "up"
  results = launch.run(cli_args(config, workdir, overrides), root=tmp_path,
                       name="up", timeout=TIMEOUT)
  assert_process0_writes_workdir(results, workdir)
  assert ((workdir / "tokenizer.model").read_bytes()
          == (tmp_path / "dense" / "tokenizer.model").read_bytes())
  reference(config, tmp_path / "one", overrides)
  assert_same_run(workdir, tmp_path / "one")


def test_mesh_leaving_a_process_without_devices_is_one_config_error(tmp_path):
  workdir = tmp_path / "run"
  overrides = {**TINY, "mesh.data": 1, "mesh.expert": 4}
  results = launch.run(cli_args("configs/quickstart.py", workdir, overrides),
                       root=tmp_path, name="mesh", timeout=TIMEOUT, check=False)
  for r in results:
    assert r.returncode == 1
    assert r.lines()[-1] == (
        "moejax: error: mesh.data=1 x mesh.expert=4 uses 4 of 8 devices, so "
        "process 1 of 2 (4 devices each) would own none; every process must own "
        "devices in the mesh: make mesh.data x mesh.expert = 8 (or set one of "
        "them to -1)")
  assert not workdir.exists()


def test_data_error_on_process_0_stops_every_process_with_its_line(tmp_path):
  corpus = tmp_path / "notes.txt"
  corpus.write_bytes(b"some text\0binary")  # Found only when process 0 reads it.
  overrides = {**TINY, "data.source": f"text:{corpus}", "mesh.data": 2,
               "mesh.expert": 4}
  results = launch.run(cli_args("configs/quickstart.py", tmp_path / "run",
                                overrides),
                       root=tmp_path, name="bad", timeout=TIMEOUT, check=False)
  for r in results:  # Process 1 waited for process 0 and got its error.
    assert r.returncode == 1
    assert r.lines()[-1] == (
        f"moejax: error: {corpus} is binary (NUL byte at offset 9); give only "
        "UTF-8 text files in data.source (or set data.bad_input=skip to drop "
        "such lines)")


def test_each_process_reads_only_its_rows(tmp_path):
  write_corpus(tmp_path / "corpus")
  args = [str(tmp_path / "corpus"), str(tmp_path / "w")]
  launch.run(args + [str(tmp_path / "p{}.json")], root=tmp_path, name="rows",
             timeout=TIMEOUT, cli=("-m", "tests.multihost.rows_probe"))
  p0, p1 = (json.loads((tmp_path / f"p{i}.json").read_text()) for i in (0, 1))
  assert p0["equal"] == p1["equal"] == [True] * 5  # Gathered: the whole batch.
  # Batch rows split over (data 2, expert 4): each process holds 4 of 8 rows,
  # reads only those, and the two halves are disjoint.
  assert p0["read"] == [[0, 1, 2, 3]] * 5 and p1["read"] == [[4, 5, 6, 7]] * 5
