"""The comparison's presets: every method parses at the dense model's active
FFN FLOPs per token, modern methods use what their papers describe, and the
reference code's settings are kept where they matter."""

import dataclasses

import numpy as np
import pytest

from moejax.models import TransformerLM
from moejax.train import parse, train_and_evaluate
from moejax.train.presets import METHODS, method_config
from tests.conftest import checkpoint_params


def _shrunk(method: str, steps: int):
  """`method`'s preset (router, options, stages, capacity factor, E = 8) on a
  small model and corpus: seconds per run."""
  c = method_config(method, steps=steps)
  c.model.num_layers, c.model.d_model, c.model.num_heads = 2, 32, 2
  c.model.d_ff = 64
  c.data.max_bytes, c.data.vocab_size, c.data.seq_len = 150_000, 512, 32
  c.data.eval_batches = 2
  c.train.batch_size = 8
  c.train.eval_every = c.train.checkpoint_every = steps
  c.train.probe_every = steps // 2
  return c


def _probe_drop_fraction(model_config, params, tokens_BL) -> float:
  _, aux = TransformerLM(model_config).apply({"params": params}, tokens_BL)
  return float(np.mean([float(m["drop_frac"]) for m in aux["layers"].values()]))


def test_stablemoe_stage_2_drops_few_probe_slots(tmp_path):
  """At the reference's capacity factor 2 the frozen distilled router's
  probe-set drops stay under a few percent (1.25 dropped 16% in the committed
  comparison)."""
  config = parse(_shrunk("stablemoe", steps=40))
  frozen = config.stages[1].model
  assert frozen.moe.capacity_factor == 2.0
  train_and_evaluate(config, tmp_path, verbose=False)
  params = checkpoint_params(tmp_path, 1, 40)
  with np.load(tmp_path / "probes" / "inputs.npz") as probes:
    tokens_BL = probes["tokens"].reshape(-1, config.data.seq_len)
  drop = _probe_drop_fraction(frozen, params, tokens_BL)
  assert drop < 0.03, drop
  # The same routing at the old factor drops more: the setting is what helps.
  old = dataclasses.replace(frozen, moe=dataclasses.replace(
      frozen.moe, capacity_factor=1.25))
  old_drop = _probe_drop_fraction(old, params, tokens_BL)
  print(f"stage-2 probe drops: cf 2.0 {drop:.4f}, cf 1.25 {old_drop:.4f}")
  assert old_drop > drop


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
