"""Each command end to end on a tiny run, as a subprocess: train, sample, eval,
--help and --print_config (run as `python -m moejax.<module>`, which is what the
console scripts of setup.py call)."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest

from moejax.parallel import MeshConfig
from moejax.train import parse
from tests.conftest import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(module: str, *args, check: bool = True,
        cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": ""}  # One device: a tiny run needs no more.
  proc = subprocess.run([sys.executable, "-m", module, *map(str, args)],
                        capture_output=True, text=True, env=env, timeout=600,
                        cwd=cwd)
  if check and proc.returncode:
    raise AssertionError(f"{module} {args} failed:\n{proc.stderr[-3000:]}")
  return proc


def _files(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes()
          for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 20-step tiny run trained by `moejax-train` from a config.json, in a
  relative workdir."""
  tmp = tmp_path_factory.mktemp("commands")
  config = tmp / "tiny.json"
  config.write_text(json.dumps(parse(tiny_config(
      train__steps=20, train__eval_every=10, train__checkpoint_every=10,
      train__probe_every=0)).to_json()))
  proc = run("moejax.train", "--config", config, "--workdir", "run", cwd=tmp)
  return tmp / "run", proc.stdout


def test_train_reports_compiling_and_steps(trained):
  workdir, stdout = trained
  assert "compiling" in stdout and "done: step=20" in stdout
  rows = [json.loads(line) for line in
          (workdir / "metrics.jsonl").read_text().splitlines()]
  assert all(r["perf/step_time"] > 0 for r in rows if "train/loss" in r)


def test_sample_prints_reproducible_text_with_experts(trained):
  workdir, _ = trained
  args = ("--workdir", workdir, "--prompt", "def main(", "--max_new_tokens", 12,
          "--seed", 3, "--show_experts", "--layer", 1, "--num_samples", 2)
  first = run("moejax.cli_sample", *args).stdout
  assert run("moejax.cli_sample", *args).stdout == first  # Same seed, same text.
  assert "[layer_1: expert per token]" in first and "def\u27e8" in first
  assert first.count("--- sample") == 2
  bad = run("moejax.cli_sample", *args[:-4], "--layer", 0, check=False)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1] == (
      "moejax: error: block 0 is not an MoE block; MoE blocks: 1")


def test_eval_scores_a_step_and_leaves_the_run_untouched(trained, tmp_path):
  workdir, _ = trained
  before = _files(workdir / "checkpoints")
  metrics = (workdir / "metrics.jsonl").read_bytes()
  out = run("moejax.cli_eval", "--workdir", workdir, "--step", 10).stdout
  result = json.loads((workdir / "eval" / "embedded-10.json").read_text())
  logged = [json.loads(line) for line in metrics.decode().splitlines()]
  at_10 = next(r["eval/loss"] for r in logged
               if r["step"] == 10 and "eval/loss" in r)
  assert result["eval/loss"] == pytest.approx(at_10, rel=1e-6)  # The trainer's.
  assert result["step"] == 10 and len(result["router/layer_1/load"]) == 4
  assert "router/load_cv" in result and "wrote" in out
  # Another source: a text file, with the run's tokenizer.
  text = tmp_path / "other.txt"
  text.write_text("".join(f"line {i}: the quick brown fox {i * 7}\n"
                          for i in range(4000)))
  run("moejax.cli_eval", "--workdir", workdir,
      f"--config.data.source=text:{text}")
  (other,) = (workdir / "eval").glob("text_*-20.json")
  assert json.loads(other.read_text())["source"] == f"text:{text}"
  assert _files(workdir / "checkpoints") == before
  assert (workdir / "metrics.jsonl").read_bytes() == metrics


def test_print_config_starts_a_new_router_from_its_defaults():
  quickstart = ROOT / "configs" / "quickstart.py"
  for router, options in (("expert_choice", []), ("hash", []),
                          ("stablemoe", [["distill_dim", 8]])):
    extra = ["--config.model.router_options.distill_dim=8"] if options else []
    out = run("moejax.train", "--config", quickstart, "--print_config",
              f"--config.model.router={router}", *extra).stdout
    moe = json.loads(out)["model"]["moe"]
    assert (moe["router"], moe["router_options"]) == (router, options)


def test_help_lists_config_keys_with_defaults():
  for module in ("moejax.train", "moejax.cli_sample", "moejax.cli_eval",
                 "moejax.cli_finetune", "moejax.cli_translate"):
    out = run(module, "--help").stdout
    for line in ("  model:", "    num_experts = 8", "    steps = 400",
                 "  expert_choice: capacity_factor=1.0, z_loss_coef=0.0",
                 "  base: num_layers=12, d_model=768, num_heads=12, d_ff=3072",
                 "--workdir", "--config"):
      assert line in out, (module, line)


def test_source_keys_are_file_names():
  from moejax.evaluate import source_key  # pylint: disable=g-import-not-at-top
  assert source_key("embedded") == "embedded"
  text = source_key("text:/data/a.txt,/data/b*.txt")
  assert text.startswith("text_a.txt+b_.txt-") and "/" not in text
  assert source_key("text:/x/a.txt") != source_key("text:/y/a.txt")
  assert source_key("tfds:wikitext/wikitext-2-raw-v1:test").startswith(
      "tfds_wikitext-2-raw-v1_test-")


def test_python_api_on_eight_devices(trained):
  """The run (trained on one device) restored on one device gives the held-out
  loss the trainer logged; on an 8-device mesh (capacity counted per device)
  nearly that, and text annotated in colour."""
  import re  # pylint: disable=g-import-not-at-top
  from moejax.evaluate import evaluate  # pylint: disable=g-import-not-at-top
  from moejax.sample import annotate, sample, token_text  # pylint: disable=g-import-not-at-top
  from moejax.train.trained import load_trained  # pylint: disable=g-import-not-at-top
  workdir, _ = trained
  run_ = load_trained(workdir)
  assert run_.mesh.size == 8 and run_.step == 20
  logged = [json.loads(line) for line in
            (workdir / "metrics.jsonl").read_text().splitlines()]
  at_20 = next(r["eval/loss"] for r in logged if r["step"] == 20 and "eval/loss" in r)
  one = dataclasses.replace(run_.config, mesh=MeshConfig(data=1, expert=1))
  assert evaluate(load_trained(workdir, config=one))["eval/loss"] == pytest.approx(
      at_20, rel=1e-6)
  assert evaluate(run_)["eval/loss"] == pytest.approx(at_20, rel=1e-3)
  (s,) = sample(run_, "def main(", max_new_tokens=8, temperature=0.0)
  legend, body = annotate(s, run_.tokenizer, colour=True).split("\n", 1)
  assert re.findall(r"\x1b\[48;5;\d+m\x1b\[30m 0 ", legend)  # Expert 0's colour.
  plain = re.sub(r"\x1b\[[0-9;]*m", "", body).replace("\u2502", "")
  assert plain == "".join(token_text(run_.tokenizer, t)
                          for t in s.tokens[1:]).removeprefix(" ")
