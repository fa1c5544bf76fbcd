"""Fine-tuning a masked-LM run as a domain classifier: windows are labelled by
their majority domain, a tiny run classifies code against docs well above the
majority baseline, the same seed gives the same result, `moejax-finetune`
writes its json and leaves every other file of the workdir as it was, and bad
input is one line."""

import dataclasses
import json

import numpy as np
import pytest

from moejax.errors import ConfigError, DataError
from moejax.finetune import FinetuneConfig, finetune, window_labels
from moejax.train import parse, train_and_evaluate
from moejax.train.trained import load_trained
from tests.conftest import tiny_config
from tests.data.corpora import snapshot
from tests.test_commands import run

STEPS = 30


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory):
  """A 30-step tiny masked-LM run on the embedded corpus (code, docs), its
  data cache in the workdir."""
  workdir = tmp_path_factory.mktemp("mlm")
  c = tiny_config(train__steps=STEPS, train__eval_every=STEPS,
                  train__checkpoint_every=STEPS, train__log_every=10,
                  train__probe_every=0)
  c.model.arch, c.data.task, c.data.cache_dir = "encoder", "mlm", ""
  train_and_evaluate(parse(c), workdir, verbose=False)
  return workdir


def test_a_window_is_labelled_with_its_majority_domain():
  domains_BL = np.array([[0, 0, 0, 1],   # Mostly 0.
                         [0, 1, 1, 1],   # A document of domain 1 began early.
                         [2, 2, 1, 1],   # A tie: the lower id.
                         [1, 1, 1, 1]])
  np.testing.assert_array_equal(window_labels(domains_BL, 3), [0, 1, 1, 1])


def test_finetuned_encoder_beats_the_majority_baseline(mlm_run):
  options = FinetuneConfig(steps=100, learning_rate=1e-3, eval_batches=8)
  result = finetune(load_trained(mlm_run), options)
  assert result["classes"] == ["code", "docs"]
  assert result["eval/examples"] == 64 and sum(result["eval/label_counts"]) == 64
  counts = result["eval/label_counts"]
  assert result["eval/baseline"] == max(counts) / sum(counts)
  assert result["eval/accuracy"] >= result["eval/baseline"] + 0.2, result
  # Below the loss of the best constant answer (the labels' entropy).
  p = np.asarray(counts) / sum(counts)
  assert result["eval/loss"] < -np.sum(p * np.log(p)) - 0.05, result
  assert result["train/loss"] < result["train/first_loss"] - 0.2
  # The same seed, the same result (the program compiled once is reused).
  again = finetune(load_trained(mlm_run), options)
  result.pop("train/time_s"), again.pop("train/time_s")
  assert again == result


def test_bad_input_is_one_line(mlm_run, tmp_path):
  trained = load_trained(mlm_run)
  decoder = dataclasses.replace(trained, model_config=dataclasses.replace(
      trained.model_config, arch="decoder"))
  with pytest.raises(ConfigError, match=r"^.* is a model.arch='decoder' run; "
                     r"moejax-finetune fine-tunes an encoder \(.*\)$"):
    finetune(decoder)
  one = tmp_path / "one.txt"
  one.write_text("".join(f"line {i}: the quick brown fox {i * 7}\n"
                         for i in range(3000)))
  data = dataclasses.replace(trained.config.data, source=f"text:{one}")
  with pytest.raises(DataError, match=r"^data.source .* has one domain \(one\); "
                     r"the classifier needs two or more: .*$"):
    finetune(trained, FinetuneConfig(steps=1), data)
  with pytest.raises(ConfigError, match=r"^steps must be a positive integer, "
                     r"got 0$"):
    finetune(trained, FinetuneConfig(steps=0))


def test_cli_writes_its_result_and_leaves_the_workdir_as_it_was(mlm_run,
                                                                tmp_path):
  before = snapshot(mlm_run)
  out = run("moejax.cli_finetune", "--workdir", mlm_run, "--steps", 20,
            "--lr", 1e-3, "--batch_size", 8, "--seed", 3,
            "--eval_batches", 2).stdout
  path = mlm_run / "finetune" / f"embedded-{STEPS}.json"
  result = json.loads(path.read_text())
  assert f"wrote {path}" in out
  assert result["steps"] == 20 and result["step"] == STEPS
  assert result["finetune"] == {"steps": 20, "learning_rate": 1e-3,
                                "batch_size": 8, "seed": 3,
                                "weight_decay": 0.01, "eval_batches": 2}
  for key in ("eval/accuracy", "eval/baseline", "eval/loss"):
    assert np.isfinite(result[key]), key
  after = snapshot(mlm_run)
  assert set(after) - set(before) == {f"finetune/embedded-{STEPS}.json"}
  assert {k: after[k] for k in before} == before
  missing = run("moejax.cli_finetune", "--workdir", tmp_path / "none",
                check=False)
  assert missing.returncode == 1
  (line,) = missing.stderr.strip().splitlines()
  assert line.startswith("moejax: error: ") and "none" in line


def test_the_comparison_scores_a_masked_lm_by_its_finetuned_accuracy(
    mlm_run, tmp_path):
  """`compare_routers.py --task mlm` scores each run as `moejax-finetune`
  would, on the test split when there is one, once (cached by step and
  options), and the report's task table shows it."""
  import shutil  # pylint: disable=g-import-not-at-top
  from experiments import report, summary, task_scores  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  shutil.copytree(mlm_run, workdir)
  options = task_scores.ScoreOptions(finetune_steps=20)
  scores = task_scores.score_run(workdir, options)
  written = json.loads(next((workdir / "finetune").glob("*.json")).read_text())
  assert scores == {"finetune_accuracy": written["eval/accuracy"],
                    "finetune_baseline": written["eval/baseline"]}
  assert written["steps"] == 20
  before = snapshot(workdir)
  assert task_scores.score_run(workdir, options) == scores  # Cached.
  assert snapshot(workdir) == before
  run = summary.read_run(workdir, "switch")
  assert run.task == "mlm" and run.scores == scores
  table = report.task_table(report.group([run]))
  assert "| method | fine-tuned accuracy (%) | majority-class accuracy (%) |" in table
  assert f"| switch | {100 * scores['finetune_accuracy']:.1f} |" in table
