"""Every registered router trains 20 steps through the trainer, and its aux loss
enters the total loss exactly once."""

import numpy as np
import pytest

from moejax.metrics.writers import read_metrics
from moejax.routing import ROUTERS
from moejax.train import parse, train_and_evaluate

OPTIONS = {"hash": {"balance": "frequency"}, "stablemoe": {"distill_dim": 8},
           "dts": {"anneal_steps": 15, "hard_step": 18}}


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_router_trains_20_steps(tmp_path, tiny, router):
  c = tiny(train__steps=20, train__log_every=5, train__eval_every=20,
           train__checkpoint_every=20, train__probe_every=10,
           model__router=router)
  c.model.moe_layers = "all"  # Two MoE layers: the aux loss sums over both.
  c.model.router_options = OPTIONS.get(router, {})
  if router in ("dselect_k", "dts") or "capacity" not in ROUTERS[router].dispatch_paths:
    c.model.dispatch = "dropless"
  summary = train_and_evaluate(parse(c), tmp_path, verbose=False)
  rows = [r for r in read_metrics(tmp_path) if "train/loss" in r]
  assert [r["step"] for r in rows] == [5, 10, 15, 20]
  for r in rows:
    values = [v for k, v in r.items() if isinstance(v, float)]
    assert np.isfinite(values).all(), r
    # total = task + aux, and aux = the sum of the two layers' router losses.
    np.testing.assert_allclose(r["train/total_loss"],
                               r["train/loss"] + r["train/aux_loss"], rtol=1e-6)
    np.testing.assert_allclose(
        r["train/aux_loss"],
        r["router/layer_0/aux_loss"] + r["router/layer_1/aux_loss"],
        rtol=1e-5, atol=1e-7)
  assert rows[-1]["train/loss"] < rows[0]["train/loss"]
  assert np.isfinite(summary["eval/loss"])
