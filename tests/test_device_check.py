"""`benchmarks/device_check.sh`, the one call prepared for a lent accelerator:
its `--cpu-smoke` mode runs every step end to end here, and every flag its
accelerator mode passes to a benchmark is one that benchmark accepts."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"
STEPS = ("kernels", "moe_layer", "train_step", "routers", "paper_step")
# What the device tool brings back from $OUT (its README's limits).
MAX_FILES = 8
NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def _env():
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  return {**env, "PYTHON": sys.executable}


def test_cpu_smoke_runs_every_step(tmp_path):
  out = tmp_path / "out"
  proc = subprocess.run(["bash", os.fspath(SCRIPT), "--cpu-smoke"],
                        env={**_env(), "OUT": os.fspath(out)},
                        capture_output=True, text=True, timeout=900)
  summary = (out / "summary.md").read_text()
  assert proc.returncode == 0, summary + proc.stdout[-3000:]
  rows = dict(re.findall(r"^\| (\w+) \| (\d+) \| \d+ \|", summary, re.M))
  assert rows == {name: "0" for name in STEPS}, summary
  assert "failed steps: 0" in summary
  files = sorted(p.name for p in out.iterdir())
  assert len(files) <= MAX_FILES and all(NAME.match(f) for f in files), files
  assert all(p.is_file() for p in out.iterdir())
  assert "passed" in (out / "kernels.txt").read_text()
  # Each benchmark printed its table, with a measured row.
  assert re.search(r"^\| 4 \| 1 \| dropless/xla \| \d", (out / "moe_layer.md")
                   .read_text(), re.M)
  assert re.search(r"^\| moe \| 1 \| dropless \| xla \|",
                   (out / "train_step.md").read_text(), re.M)
  assert re.search(r"^\| switch \|", (out / "routers.md").read_text(), re.M)
  (row,) = json.loads((out / "paper_step.json").read_text())["rows"]
  assert "error" not in row, row
  assert row["step_s"] > 0 and math.isfinite(row["loss"])


def _accelerator_invocations() -> list[tuple[str, list[str]]]:
  """(benchmark script, flags) of each step of the accelerator branch."""
  text = SCRIPT.read_text().replace("\\\n", " ")
  branch = text[text.index("\nelse\n"):text.rindex("\nfi\n")]
  calls = re.findall(r'"\$PY" (benchmarks/\w+\.py)([^\n]*)', branch)
  return [(path, re.findall(r"(?<!\S)(--[a-z][\w-]*)", args))
          for path, args in calls]


def test_accelerator_steps_use_flags_their_benchmarks_accept():
  calls = _accelerator_invocations()
  assert sorted(p for p, _ in calls) == sorted(
      f"benchmarks/{n}.py" for n in ("moe_layer", "train_step", "routers",
                                     "scale"))
  for path, flags in calls:
    usage = subprocess.run([sys.executable, os.fspath(ROOT / path), "--help"],
                           env=_env(), capture_output=True, text=True,
                           timeout=300, check=True).stdout
    accepted = set(re.findall(r"(--[a-z][\w-]*)", usage))
    assert set(flags) <= accepted, (path, set(flags) - accepted)
