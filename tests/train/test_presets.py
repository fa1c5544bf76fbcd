"""The comparison's presets: every method parses, at the dense model's active
FFN FLOPs per token."""

import pytest

from moejax.train import parse
from moejax.train.presets import METHODS, method_config


@pytest.mark.parametrize("method", METHODS)
def test_every_method_has_the_dense_active_ffn_width(method):
  config = parse(method_config(method, steps=100))
  dense_width = config.model.d_ff  # F = 512.
  for stage in config.stages:
    if not stage.model.moe_layers:
      continue
    moe = stage.model.moe
    # K routed (or, for variable-K routers, the target/average K) plus K_s
    # shared experts, each of width F_e: K * F_e + K_s * F_e = F.
    assert (moe.top_k + moe.num_shared_experts) * moe.d_ff == dense_width, method


def test_modern_methods_use_what_their_papers_describe():
  deepseek = parse(method_config("deepseek")).model.moe
  options = dict(deepseek.router_options)
  assert (deepseek.num_experts, deepseek.top_k, deepseek.num_shared_experts,
          deepseek.d_ff) == (32, 3, 1, 128)
  assert (options["score"], options["balance"]) == ("sigmoid", "bias+sequence")
  qwen = parse(method_config("qwen")).model.moe
  topk = parse(method_config("topk")).model.moe
  assert dict(qwen.router_options)["balance"] == "global"
  assert dict(topk.router_options)["micro_batches"] == 4  # Micro-batch aux.
  remoe = parse(method_config("remoe")).model.moe
  assert (remoe.router, remoe.dispatch) == ("remoe", "dropless")
