"""Stage machines end to end: StableMoE freezes, EvoMoE sparsifies, resume works."""

import json

import numpy as np
import pytest

from moejax.metrics.writers import read_metrics, series
from moejax.train import parse, train_and_evaluate
from moejax.train.config import stage_config
from moejax.train import loop
from tests.conftest import checkpoint_params, tiny_config, tiny_stablemoe


def evomoe(tiny, **train):
  train = {"steps": 30, "probe_every": 5, "checkpoint_every": 10, **train}
  c = tiny(**{f"train__{k}": v for k, v in train.items()})
  c.model.router = "dts"
  c.model.dispatch = "dropless"
  # Stage 1 runs stage steps 0..19 (global 11..30): hard from stage step 5.
  c.model.router_options = {"tau_max": 3.0, "tau_min": 0.1, "anneal_steps": 5,
                            "hard_step": 5}
  c.stages = [stage_config("dense", steps=10, model={"moe_layers": "none"}),
              stage_config("dts", transform="diversify",
                           transform_options={"mask_ratio": 0.1})]
  return c


def test_stablemoe_freezes_the_distilled_router(tmp_path, tiny):
  config = tiny_stablemoe(train__probe_every=5, train__checkpoint_every=10)
  train_and_evaluate(parse(config), tmp_path, verbose=False)
  rows = read_metrics(tmp_path)
  assert all("stage" in r and "stage_name" in r for r in rows)
  assert {(r["stage"], r["stage_name"]) for r in rows} == {(0, "distill"),
                                                           (1, "frozen")}
  # Entering stage 1 saved a checkpoint at the boundary; 20 steps later the
  # distilled router is bit-identical while the rest of the model moved.
  before = checkpoint_params(tmp_path, 1, 10)["block_1"]["moe"]
  after = checkpoint_params(tmp_path, 1, 30)["block_1"]["moe"]
  for name in ("distill_embedding", "distill_centroids"):
    np.testing.assert_array_equal(after["router"][name], before["router"][name])
  assert not np.array_equal(after["router"]["centroids"],
                            before["router"]["centroids"])
  assert not np.array_equal(after["experts"]["w_in"], before["experts"]["w_in"])
  # Routing never changes in stage 1: fluctuation is exactly 0 after its first probe.
  steps, fluct = series([r for r in rows if r["stage"] == 1], "router/fluctuation")
  assert steps == [15, 20, 25, 30]
  assert fluct[1:] == [0.0, 0.0, 0.0]
  # The distillation loss is reported in stage 0 only.
  _, distill = series(rows, "router/distill_loss")
  assert distill[0] > 0 and distill[-1] == 0.0
  curve = json.loads((tmp_path / "fluctuation.json").read_text())
  assert curve["steps"] == list(range(5, 31, 5))
  assert curve["settled_share"][-1] == 1.0
  assert (tmp_path / "fluctuation.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def evomoe_run(tmp_path_factory):
  """The workdir of `evomoe(tiny_config)` trained through, once per worker."""
  workdir = tmp_path_factory.mktemp("evomoe")
  train_and_evaluate(parse(evomoe(tiny_config)), workdir, verbose=False)
  return workdir


def test_evomoe_goes_from_dense_to_one_expert(evomoe_run):
  rows = read_metrics(evomoe_run)
  dense = [r for r in rows if r["stage"] == 0 and "train/loss" in r]
  assert dense and not any("router/experts_per_token" in r for r in dense)
  steps, k = series(rows, "router/experts_per_token")
  # Global step 15 is stage step 4 (soft); from stage step 5 on, sampled top-1.
  assert steps == [15, 20, 25, 30] and k[0] > 1.0 and k[1:] == [1.0, 1.0, 1.0]
  first = checkpoint_params(evomoe_run, 1, 10)["block_1"]["moe"]["experts"]["w_in"]
  assert first.shape[0] == 4
  zero = (np.asarray(first) == 0).mean()
  assert 0.05 < zero < 0.15  # mask_ratio 0.1.


def test_evomoe_soft_phase_uses_many_experts(tmp_path, tiny):
  c = evomoe(tiny, log_every=1, steps=15, eval_every=15)
  train_and_evaluate(parse(c), tmp_path, verbose=False)
  k = series(read_metrics(tmp_path), "router/experts_per_token")[1]
  assert len(k) == 5 and k[0] > 2.0 and k[-1] < k[0]  # Sparser as tau anneals.


class _Crash(Exception):
  pass


@pytest.mark.parametrize("where", ["mid_stage", "entering_stage"])
def test_resume_across_a_stage_boundary_reproduces_the_run(
    tmp_path, evomoe_run, monkeypatch, where):
  config = parse(evomoe(tiny_config))
  if where == "mid_stage":  # After the stage-1 boundary checkpoint, at step 15.
    real = loop.MetricWriter.write

    def crash(self, step, metrics):
      real(self, step, metrics)
      if step == 15:
        raise _Crash()
    monkeypatch.setattr(loop.MetricWriter, "write", crash)
  else:  # After stage 0's last checkpoint, before the transform is saved.
    def crash(*args, **kwargs):
      raise _Crash()
    monkeypatch.setattr(loop, "enter_stage", crash)
  with pytest.raises(_Crash):
    train_and_evaluate(config, tmp_path / "resumed", verbose=False)
  monkeypatch.undo()
  train_and_evaluate(config, tmp_path / "resumed", verbose=False)
  straight = read_metrics(evomoe_run)
  resumed = read_metrics(tmp_path / "resumed")
  for key in ("train/loss", "router/experts_per_token", "eval/loss",
              "router/fluctuation"):
    s_steps, s_vals = series(straight, key)
    r_steps, r_vals = series(resumed, key)
    assert s_steps == r_steps, key
    np.testing.assert_allclose(r_vals, s_vals, rtol=1e-6, err_msg=key)
