"""Throughput is measured on training steps only; compilation is announced."""

import time

from moejax.metrics.writers import read_metrics, series
from moejax.train import parse, train_and_evaluate
from moejax.train.program import Evaluator


def test_evaluation_time_is_not_training_time(tmp_path, tiny, monkeypatch,
                                              capsys):
  real_call = Evaluator.__call__

  def slow_eval(self, variables):
    time.sleep(2.0)  # Far longer than the 4 tiny steps of a log interval.
    return real_call(self, variables)

  monkeypatch.setattr(Evaluator, "__call__", slow_eval)
  config = parse(tiny(train__steps=15, train__log_every=5, train__eval_every=5,
                      train__checkpoint_every=15, train__probe_every=0))
  train_and_evaluate(config, tmp_path, verbose=True)
  rows = read_metrics(tmp_path)
  steps, step_time = series(rows, "perf/step_time")
  _, tokens_per_sec = series(rows, "perf/tokens_per_sec")
  assert steps == [5, 10, 15]
  # With the 2 s evaluations counted, steps 6-10 and 11-15 would take >= 0.4 s.
  assert max(step_time) < 0.3, step_time
  for t, tps in zip(step_time, tokens_per_sec):
    assert abs(tps - 8 * 32 / t) < 1e-6 * tps  # B * L tokens per step.
  assert "perf/mfu" not in rows[0]  # No known peak on a CPU.
  out = capsys.readouterr().out
  assert "compiling the train step of stage 0 (train) ..." in out
  assert "compiled stage 0 (train) and ran its first step in" in out
