"""The MoE layer as a Flax NNX module.

Shapes: B batch, L length, D model width, F hidden width, E experts.

`MoELayer(d_model, router="topk", num_experts=E, d_ff=F, ..., rngs=nnx.Rngs(
params=0, router=1))` takes every field of `moejax.moe.MoELayer` (linen),
wraps that layer with `nnx.bridge.ToNNX` and initialises it in the
constructor, so it needs no mesh or sharding context: its params keep their
logical axis names (`expert`, `embed`, `mlp`) as metadata, and
`shard(module, mesh)` lays them out with moejax's rules. Routers that draw random numbers in training (jitter, the DTS
gate) read the `router` stream of the Rngs.

Checked with flax 0.12.8 (Python 3.11) and 0.12.12 (3.12).
"""

import dataclasses
from typing import Any

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax.moe import layer as linen_layer
from moejax.parallel.rules import LOGICAL_AXIS_RULES


# Every field of the linen layer is an argument here (not `parent`, `name`).
LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(linen_layer.MoELayer)
                     if f.init and f.name not in ("parent", "name"))


class MoELayer(nnx.Module):
  """A sparse FFN [B, L, D] -> ([B, L, D], `moejax.moe.MoEAux`), NNX-style.

  Takes `d_model` (D, to create the params), `rngs`, and, as keywords, every
  field of `moejax.moe.MoELayer` (`LAYER_FIELDS`, with the same defaults),
  forwarded to the linen layer it wraps.
  """

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, **layer_fields: Any):
    unknown = sorted(set(layer_fields) - set(LAYER_FIELDS))
    if unknown:
      raise ConfigError(f"moejax.nnx.MoELayer has no argument "
                        f"{', '.join(unknown)}; valid: {', '.join(LAYER_FIELDS)}")
    layer = linen_layer.MoELayer(**layer_fields)
    # Variables carry logical names, not mesh shardings: no context needed.
    with nnx.use_eager_sharding(False):
      self.moe = nnx.bridge.ToNNX(layer, rngs=rngs)
      tokens = layer.num_experts
      x_BLD = jnp.zeros((1, tokens, d_model), layer.dtype)
      nnx.bridge.lazy_init(self.moe, x_BLD,
                           token_ids_BL=jnp.zeros((1, tokens), jnp.int32),
                           residual_BLD=x_BLD)

  def __call__(self, x_BLD: jax.Array, *, token_ids_BL: jax.Array | None = None,
               step: jax.Array | None = None, deterministic: bool = True,
               residual_BLD: jax.Array | None = None):
    """`deterministic=False` trains: routers use their `router` rng stream;
    `residual_BLD` [B, L, D] feeds deep experts (`expert_depth` > 1)."""
    return self.moe(x_BLD, token_ids_BL=token_ids_BL, step=step,
                    deterministic=deterministic, residual_BLD=residual_BLD)


def shard(module: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
  """Places `module`'s params on `mesh` by their logical axis names and
  `moejax.parallel.LOGICAL_AXIS_RULES` (experts split over `expert`, the rest
  replicated); returns the module."""
  state = nnx.state(module, nnx.Param)
  shardings = nn.logical_to_mesh_sharding(nnx.get_partition_spec(state), mesh,
                                          LOGICAL_AXIS_RULES)
  nnx.update(module, jax.device_put(state, shardings))
  return module
