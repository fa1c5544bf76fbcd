"""End-to-end runs: the loss falls, resume reproduces the curve, NaN stops cleanly."""

import pathlib

import numpy as np
import pytest

from moejax.errors import CheckpointError, TrainingDiverged
from moejax.metrics.writers import read_metrics, series
from moejax.train import parse, train_and_evaluate
from moejax.metrics.writers import MetricWriter


def _snapshot(workdir: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(workdir)): p.read_bytes()
          for p in sorted(workdir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_tiny_run_learns_and_writes_outputs(tmp_path, tiny, dispatch):
  summary = train_and_evaluate(
      parse(tiny(model__dispatch=dispatch, train__steps=60)), tmp_path,
      verbose=False)
  rows = read_metrics(tmp_path)
  steps, losses = series(rows, "train/loss")
  assert steps == list(range(5, 61, 5))
  assert np.mean(losses[-3:]) < np.mean(losses[:2]) - 0.5  # Clearly falling.
  _, ppl = series(rows, "eval/ppl")
  assert len(ppl) == 3 and ppl[-1] < ppl[0]
  first = next(r for r in rows if "train/loss" in r)
  for key in ("train/aux_loss", "perf/tokens_per_sec", "router/drop_frac",
              "router/load_max_over_mean", "router/layer_1/entropy"):
    assert key in first, key
  assert summary["step"] == 60 and np.isfinite(summary["eval/loss"])
  for name in ("config.json", "tokenizer.model", "checkpoints"):
    assert (tmp_path / name).exists(), name
  assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
  stage_dir = tmp_path / "checkpoints" / "stage_0"
  assert sorted(int(p.name) for p in stage_dir.iterdir()
                if p.name.isdigit()) == [20, 40, 60]


class _Crash(Exception):
  pass


def test_stop_and_resume_reproduces_the_uninterrupted_run(tmp_path, tiny,
                                                          monkeypatch):
  config = parse(tiny(train__steps=40))
  train_and_evaluate(config, tmp_path / "straight", verbose=False)

  real_write = MetricWriter.write

  def crash_at_30(self, step, metrics):
    real_write(self, step, metrics)
    if step == 30:  # After the step-20 checkpoint, before the step-40 one.
      raise _Crash()

  monkeypatch.setattr(MetricWriter, "write", crash_at_30)
  with pytest.raises(_Crash):
    train_and_evaluate(config, tmp_path / "resumed", verbose=False)
  monkeypatch.setattr(MetricWriter, "write", real_write)
  train_and_evaluate(config, tmp_path / "resumed", verbose=False)

  straight = read_metrics(tmp_path / "straight")
  resumed = read_metrics(tmp_path / "resumed")
  for key in ("train/loss", "train/aux_loss", "router/drop_frac", "eval/loss"):
    s_steps, s_vals = series(straight, key)
    r_steps, r_vals = series(resumed, key)
    assert s_steps == r_steps, key  # One row per step: stale rows were removed.
    np.testing.assert_allclose(r_vals, s_vals, rtol=1e-6, err_msg=key)
  assert (tmp_path / "resumed" / "metrics.discarded.jsonl").exists()


def test_mismatched_workdir_is_refused_and_untouched(tmp_path, tiny):
  train_and_evaluate(parse(tiny(train__steps=5, train__checkpoint_every=5)),
                     tmp_path, verbose=False)
  before = _snapshot(tmp_path)
  with pytest.raises(CheckpointError, match="model.moe.num_experts: 4 in the "
                     "workdir, 8 now"):
    train_and_evaluate(parse(tiny(model__num_experts=8)), tmp_path,
                       verbose=False)
  assert _snapshot(tmp_path) == before


def test_longer_run_resumes_and_keeps_the_original_config(tmp_path, tiny):
  train_and_evaluate(parse(tiny(train__steps=10, train__checkpoint_every=10)),
                     tmp_path, verbose=False)
  original = (tmp_path / "config.json").read_text()
  summary = train_and_evaluate(parse(tiny(train__steps=15)), tmp_path,
                               verbose=False)
  assert summary["step"] == 15
  assert (tmp_path / "config.json").read_text() == original
  assert (tmp_path / "config.1.json").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny):
  train_and_evaluate(parse(tiny(train__steps=5, train__checkpoint_every=5)),
                     tmp_path, verbose=False)
  good = _snapshot(tmp_path / "checkpoints")
  diverging = tiny(train__steps=40, train__checkpoint_every=5,
                   train__log_every=1, optim__learning_rate=1e30,
                   optim__grad_clip=0.0, optim__warmup_steps=0)
  with pytest.raises(TrainingDiverged, match=r"last good checkpoint \(step 5\)"):
    train_and_evaluate(parse(diverging), tmp_path, verbose=False)
  assert _snapshot(tmp_path / "checkpoints") == good
