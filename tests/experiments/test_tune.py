"""The tuning selection on hand-made grids."""

import math

from experiments import tune


def entry(method, init, lr, ppl, **extra):
  return {"method": method, "ffn_init": init, "learning_rate": lr,
          "valid_ppl": list(ppl), **extra}


def test_select_takes_the_lowest_mean_validation_ppl_per_method():
  grid = [entry("dense", "normal", 1e-3, [50.0, 52.0]),   # mean 51
          entry("dense", "fan_in", 1e-3, [49.0, 54.0]),   # mean 51.5
          entry("dense", "fan_in", 3e-3, [math.inf, 40.0]),  # diverged at seed 0
          entry("switch", "normal", 1e-3, [60.0]),
          entry("switch", "fan_in", 1e-3, [60.0])]        # tie: the first wins
  chosen = tune.select(grid)
  assert chosen == {
      "dense": {"ffn_init": "normal", "learning_rate": 1e-3, "valid_ppl_mean": 51.0},
      "switch": {"ffn_init": "normal", "learning_rate": 1e-3,
                 "valid_ppl_mean": 60.0}}


def test_select_reads_only_validation_numbers():
  """Whatever else an entry carries (a test PPL, say) cannot change a choice."""
  grid = [entry("dense", "normal", 1e-3, [50.0], test_ppl=[90.0]),
          entry("dense", "fan_in", 1e-3, [51.0], test_ppl=[10.0])]
  assert tune.select(grid)["dense"]["ffn_init"] == "normal"
  stripped = [{k: v for k, v in e.items() if k != "test_ppl"} for e in grid]
  assert tune.select(grid) == tune.select(stripped)
