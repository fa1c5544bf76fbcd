"""A run's config.json maps back to a ConfigDict that parses to the same run."""

import json

import pytest

from moejax.errors import ConfigError
from moejax.train import parse
from moejax.train.config import stage_config
from moejax.train.config_io import config_from_json
from moejax.train.presets import METHODS, method_config


def _json(config) -> dict:
  return json.loads(json.dumps(parse(config).to_json()))


def _user_frozen_stablemoe():
  c = method_config("stablemoe")
  c.model.top_k = 1
  c.stages[1].frozen = [r".*/attn/.*"]  # A rule of the user's besides the transform's.
  return c


def _router_change_between_stages():
  c = method_config("switch")
  c.model.router_options = {"jitter": 0.1}
  c.stages = [stage_config("a", steps=100, model={"router": "topk", "top_k": 2}),
              stage_config("b", model={"router_options": {"jitter": 0.0}})]
  return c


CONFIGS = {**{m: (lambda m=m: method_config(m)) for m in METHODS},
           "user_frozen": _user_frozen_stablemoe,
           "router_change": _router_change_between_stages}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_json_parses_to_the_same_run(name):
  resolved = _json(CONFIGS[name]())
  assert _json(config_from_json(resolved)) == resolved


def test_a_longer_run_from_config_json_lengthens_the_last_stage():
  resolved = _json(method_config("stablemoe", steps=600))
  c = config_from_json(resolved)
  c.train.steps = 1000
  stages = parse(c).stages
  assert [s.steps for s in stages] == [120, 880]
  single = config_from_json(_json(method_config("switch", steps=600)))
  single.train.steps = 900
  assert [s.steps for s in parse(single).stages] == [900]


def test_not_a_run_config_is_a_one_line_error():
  with pytest.raises(ConfigError, match="is not a moejax run config"):
    config_from_json({"model": {}})
