"""`model.ffn_init` and `model.equal_flops`: parsed, validated, recorded."""

import pytest

from moejax.errors import ConfigError
from moejax.models.config import expert_width
from moejax.train import parse
from moejax.train.presets import method_config


def quickstart_topk(**model):
  """The quickstart (Switch preset) with `--config.model.router=topk
  --config.model.top_k=2` and further model overrides."""
  c = method_config("switch", steps=500)
  c.model.router = "topk"
  c.model.router_options = {}
  c.model.top_k = 2
  for key, value in model.items():
    c.model[key] = value
  return c


def flops(config) -> int:
  return config.to_json()["derived"]["active_ffn_flops_per_token"]["train"]


def test_top2_on_the_quickstart_keeps_the_dense_active_flops():
  dense = parse(method_config("dense"))
  top2 = parse(quickstart_topk())
  assert top2.model.moe.d_ff == 256  # F / K = 512 / 2.
  assert parse(method_config("topk")).model.moe.d_ff == 256  # The preset too.
  # 4 blocks x 2 matmuls x 2 D F = 4 * 4 * 128 * 512 FLOPs per token.
  assert flops(dense) == flops(top2) == 4 * 4 * 128 * 512


def test_equal_flops_off_or_an_explicit_width_keeps_that_width():
  off = parse(quickstart_topk(equal_flops=False))
  assert off.model.moe.d_ff == 512
  # Blocks 0, 2 dense (4 D F each); blocks 1, 3 two experts of width F each.
  assert flops(off) == 4 * 128 * (2 * 512 + 2 * 2 * 512)
  assert parse(quickstart_topk(expert_d_ff=128)).model.moe.d_ff == 128


def test_width_rule_counts_shared_experts_and_refuses_a_ragged_split():
  assert expert_width(512, top_k=1, expert_d_ff=None, equal_flops=True) == 512
  assert expert_width(512, top_k=2, expert_d_ff=None, equal_flops=True,
                      num_shared=2) == 128
  with pytest.raises(ConfigError, match="does not divide.*model.expert_d_ff"):
    parse(quickstart_topk(top_k=3))


def test_ffn_init_is_recorded_and_validated():
  c = method_config("dense")
  c.model.ffn_init = "fan_in_depth"
  assert parse(c).to_json()["model"]["ffn_init"] == "fan_in_depth"
  c.model.ffn_init = "orthogonal"
  with pytest.raises(ConfigError, match="model.ffn_init='orthogonal' is not valid"):
    parse(c)
