"""What a finished run's last checkpoint says: router drift and test perplexity.

- Router drift, per MoE layer: ||r_T - r_0|| / ||r_0|| over all the router's
  params (Frobenius norm of the concatenation), r_T at the last checkpoint, r_0
  redrawn from the run's init key (`moejax.train.program.run_keys`): every stage's
  fresh params come from that key, and the routers of the presets are created
  by the last stage's fresh init (or carried unchanged into it), so r_0 is the
  fresh init of the last stage's model. None for routers without params (hash).
- Test perplexity: the mean next-token loss over `data.test_batches` (the test
  split that neither training nor selection sees), only when asked for
  (`test=True`: the comparison asks, a tuning sweep never does), None without a
  test split.

Both are cached in the run's `final_state.json`, keyed by the checkpoint step.
"""

import json
import math
import pathlib

import flax.linen as nn
import jax
import numpy as np

from moejax.data import DataConfig, load_datasets
from moejax.layout import layer_name
from moejax.models import make_model
from moejax.models.config import transformer_config_from_json
from moejax.train.checkpoint import restore_params
from moejax.train.inputs import example_inputs
from moejax.train.program import Evaluator, run_keys

FINAL_STATE_FILE = "final_state.json"


def _relative_drift(final: dict, init: dict) -> float | None:
  final_leaves = jax.tree.leaves(final)
  init_leaves = jax.tree.leaves(init)
  if not final_leaves:
    return None
  num = sum(float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64))
                         ** 2)) for a, b in zip(final_leaves, init_leaves))
  den = sum(float(np.sum(np.asarray(b, np.float64) ** 2)) for b in init_leaves)
  return math.sqrt(num / den) if den > 0 else None


def router_drift(params: dict, init_params: dict) -> dict[str, float | None]:
  """{MoE layer name (`layer_<i>`; an encoder-decoder's `encoder_layer_<i>`,
  `decoder_layer_<i>`): relative distance of its router params from init}."""
  out = {}
  stacks = [(None, params, init_params)] + [
      (stack, params[stack], init_params[stack])
      for stack in ("encoder", "decoder") if stack in params]
  for stack, blocks, init_blocks in stacks:
    for name, block in sorted(blocks.items()):
      if not name.startswith("block_") or "moe" not in block:
        continue
      router = block["moe"].get("router", {})
      out[layer_name(int(name.split("_")[1]), stack)] = _relative_drift(
          router, init_blocks[name]["moe"].get("router", {}))
  return out


def _last_step(workdir: pathlib.Path) -> int:
  steps = [int(p.name) for p in (workdir / "checkpoints").glob("stage_*/[0-9]*")]
  return max(steps, default=-1)


def final_state(workdir: str | pathlib.Path, *, test: bool) -> dict:
  """{"step", "router_drift": {layer: float | None}, and with `test` "test":
  {"loss", "ppl"} or None} of the run in `workdir` (cached)."""
  workdir = pathlib.Path(workdir)
  cache = workdir / FINAL_STATE_FILE
  step = _last_step(workdir)
  if cache.exists():
    cached = json.loads(cache.read_text())
    if cached["step"] == step and (not test or "test" in cached):
      return cached
  config = json.loads((workdir / "config.json").read_text())
  model_config = transformer_config_from_json(config["model"])
  model = make_model(model_config)
  params, model_state = restore_params(workdir / "checkpoints")
  drift = {}
  if model_config.has_moe:
    init_rng, _ = run_keys(config["train"]["seed"])
    inputs = example_inputs(model_config, config["data"]["seq_len"],
                            config["data"].get("target_len"))
    init = nn.unbox(jax.jit(model.init)(init_rng, *inputs))["params"]
    drift = router_drift(params, init)
  out = {"step": step, "router_drift": drift}
  if test:
    out["test"] = None
    if config["data"].get("test_fraction"):
      data = load_datasets(DataConfig(**config["data"]), workdir=workdir,
                           batch_size=config["train"]["batch_size"])
      row = Evaluator(model, data.test_batches)({"params": params, **model_state})
      out["test"] = {"loss": row["eval/loss"], "ppl": row["eval/ppl"]}
  cache.write_text(json.dumps(out) + "\n")
  return out
