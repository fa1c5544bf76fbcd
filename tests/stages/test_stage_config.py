"""Stage lists in the config: lengths, overrides and clear errors."""

import pytest

from moejax.errors import ConfigError
from moejax.train import parse
from moejax.train.config import stage_config


def test_fractions_and_remainder(tiny):
  c = tiny(train__steps=100)
  c.stages = [stage_config("a", fraction=0.25), stage_config("b", steps=30),
              stage_config("c")]
  stages = parse(c).stages
  assert [s.steps for s in stages] == [25, 30, 45]


def test_stage_model_overrides_merge_router_options(tiny):
  c = tiny()
  c.model.router = "stablemoe"
  c.model.router_options = {"distill_dim": 8}
  c.stages = [stage_config("one", steps=10),
              stage_config("two", transform="freeze_distilled_router",
                           model={"router_options": {"stage": 2}})]
  one, two = parse(c).stages
  assert dict(one.model.moe.router_options) == {"distill_dim": 8}
  assert dict(two.model.moe.router_options) == {"distill_dim": 8, "stage": 2}
  assert two.frozen == (r".*/router/distill_(embedding|centroids)$",)


@pytest.mark.parametrize("stages,match", [
    ([stage_config("a", steps=10), stage_config("b", steps=10)],
     r"stages cover \[10, 10\] steps but train.steps=40"),
    ([stage_config("a"), stage_config("b")], "only one stage may leave"),
    ([stage_config("a", steps=5, fraction=0.5), stage_config("b")], "both steps"),
    ([stage_config("a", steps=10), stage_config("b", transform="nope")],
     "unknown stage transform 'nope'; valid: diversify, freeze_distilled_router"),
    ([stage_config("a", steps=10),
      stage_config("b", transform="diversify", transform_options={"bad": 1})],
     "has no option 'bad'"),
    ([stage_config("a", transform="upcycle")], "nothing precedes it"),
    ([stage_config("a", steps=10), stage_config("a")], "stage names must differ"),
    ([stage_config("a", steps=10, model={"routr": "x"}), stage_config("b")],
     "unknown keys \\['routr'\\]"),
    ([stage_config("a", frozen=["(unclosed"])], "not a valid regex"),
])
def test_bad_stage_lists(tiny, stages, match):
  c = tiny()
  c.stages = stages
  with pytest.raises(ConfigError, match=match):
    parse(c)
