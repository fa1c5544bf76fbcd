"""Model size presets (`model.size`) and parameter counts.

A preset names the backbone's shape: blocks, D, heads and the dense FFN width
F (experts have width F unless `model.expert_d_ff` is set). The number of
experts, the router and which blocks are MoE stay separate keys.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax.models.config import TransformerConfig
from moejax.models.encdec import make_model

SHAPE_KEYS = ("num_layers", "d_model", "num_heads", "d_ff")

SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(num_layers=2, d_model=64, num_heads=2, d_ff=256),
    "small": dict(num_layers=4, d_model=128, num_heads=4, d_ff=512),
    "medium": dict(num_layers=6, d_model=256, num_heads=4, d_ff=1024),
    # Vaswani et al.'s Transformer-base (per stack of an encoder-decoder).
    "transformer_base": dict(num_layers=6, d_model=512, num_heads=8, d_ff=2048),
    "base": dict(num_layers=12, d_model=768, num_heads=12, d_ff=3072),
    "large": dict(num_layers=24, d_model=1024, num_heads=16, d_ff=4096),
}


def apply_size(model: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
  """`model` (config.model as a dict) with the shape of preset `model["size"]`.

  The preset fills the shape keys still at their `defaults`; a key set to
  another value wins (`size=base, num_layers=6` is base with 6 blocks). An
  empty size changes nothing.
  """
  size = model.get("size") or ""
  if not size:
    return model
  if size not in SIZES:
    raise ConfigError(f"model.size={size!r} is not a preset; choose one of "
                      f"{', '.join(SIZES)} (or '' to set the shape keys yourself)")
  return {**model, **{k: v for k, v in SIZES[size].items()
                      if model[k] == defaults[k]}}


def param_counts(config: TransformerConfig) -> tuple[int, int]:
  """(total params, params active per token): an MoE layer's token uses K of
  its E experts (its router and everything outside the experts always).
  An encoder-decoder counts both stacks."""
  one_token = jnp.zeros((1, 1), jnp.int32)
  inputs = (one_token,) * (2 if config.arch == "encdec" else 1)
  abstract = jax.eval_shape(
      lambda: nn.unbox(make_model(config).init(jax.random.key(0), *inputs)))
  total, experts = 0, 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract["params"]):
    n = math.prod(leaf.shape)
    total += n
    if any(getattr(p, "key", None) == "experts" for p in path):
      experts += n
  moe = config.moe
  inactive = experts * (moe.num_experts - min(moe.top_k, moe.num_experts)) // (
      moe.num_experts)
  return total, total - inactive

