"""The trainer on device meshes: same curve as one device, checkpoints reshard,
every router and both stage machines run expert-parallel."""

import numpy as np
import pytest

from moejax.errors import ConfigError
from moejax.metrics.writers import read_metrics, series
from moejax.train import parse, train_and_evaluate
from moejax.train.config import stage_config
from moejax.train.presets import ROUTERS
from tests.conftest import tiny_stablemoe


def _stablemoe(tiny, data, expert):
  c = tiny_stablemoe(train__checkpoint_every=30, train__eval_every=30,
                     model__num_experts=8,
                     model__capacity_factor=8.0)  # No drops anywhere.
  c.mesh.data, c.mesh.expert = data, expert
  return c


def test_stablemoe_on_an_8way_expert_mesh_follows_one_device(tmp_path, tiny):
  one = train_and_evaluate(parse(_stablemoe(tiny, 1, 1)), tmp_path / "one",
                           verbose=False)
  eight = train_and_evaluate(parse(_stablemoe(tiny, 1, 8)), tmp_path / "eight",
                             verbose=False)
  _, a = series(read_metrics(tmp_path / "one"), "train/loss")
  _, b = series(read_metrics(tmp_path / "eight"), "train/loss")
  # Same math, other reduction orders: float32 drift stays far below the signal.
  np.testing.assert_allclose(b, a, rtol=2e-4)
  np.testing.assert_allclose(eight["eval/loss"], one["eval/loss"], rtol=2e-4)

  # The 8-way checkpoint restores onto 4x2 and onto one device: same eval loss.
  for data, expert in ((4, 2), (1, 1)):
    again = train_and_evaluate(parse(_stablemoe(tiny, data, expert)),
                               tmp_path / "eight", verbose=False)
    np.testing.assert_allclose(again["eval/loss"], eight["eval/loss"], rtol=1e-5)


@pytest.mark.parametrize("router", ROUTERS)
def test_every_router_trains_on_a_2x4_mesh(tmp_path, tiny, router):
  c = tiny(train__steps=6, train__log_every=2, train__eval_every=6,
           train__checkpoint_every=6, model__router=router)
  c.model.dispatch = "dropless" if router == "dselect_k" else "capacity"
  c.model.router_options = {"balance": "frequency"} if router == "hash" else {}
  c.mesh.data, c.mesh.expert = 2, 4
  summary = train_and_evaluate(parse(c), tmp_path, verbose=False)
  _, losses = series(read_metrics(tmp_path), "train/loss")
  assert len(losses) == 3 and np.isfinite(losses).all()
  assert np.isfinite(summary["eval/loss"])


def test_evomoe_on_a_mesh(tmp_path, tiny):
  c = tiny(train__steps=12, train__checkpoint_every=12, train__eval_every=12)
  c.model.router = "dts"
  c.model.dispatch = "dropless"
  c.stages = [stage_config("dense", steps=4, model={"moe_layers": "none"}),
              stage_config("dts", transform="diversify")]
  c.mesh.data, c.mesh.expert = 2, 4
  summary = train_and_evaluate(parse(c), tmp_path, verbose=False)
  assert np.isfinite(summary["eval/loss"])


def test_bad_mesh_is_a_clear_error_before_anything_is_written(tmp_path, tiny):
  c = tiny()
  c.mesh.data, c.mesh.expert = 1, 3  # 4 experts do not split over 3 devices.
  with pytest.raises(ConfigError, match="num_experts=4 is not divisible by "
                     "mesh.expert=3"):
    train_and_evaluate(parse(c), tmp_path / "run", verbose=False)
  assert not (tmp_path / "run").exists()
  c.mesh.data, c.mesh.expert = -1, 3
  with pytest.raises(ConfigError, match="8 devices do not split into mesh axes "
                     "of size 3"):
    train_and_evaluate(parse(c), tmp_path / "run", verbose=False)
  c.mesh.data, c.mesh.expert = 1, 16
  with pytest.raises(ConfigError, match="16 devices, but 8 are available"):
    train_and_evaluate(parse(c), tmp_path / "run", verbose=False)
