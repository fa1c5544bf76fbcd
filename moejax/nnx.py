"""The MoE layer as a Flax NNX module.

Shapes: B batch, L length, D model width, F hidden width, E experts.

`MoELayer(d_model, num_experts=E, d_ff=F, router="topk", ..., rngs=nnx.Rngs(
params=0, router=1))` wraps `moejax.moe.MoELayer` (linen) with
`nnx.bridge.ToNNX` and initialises it in the constructor, so it needs no mesh
or sharding context: its params keep their logical axis names (`expert`,
`embed`, `mlp`) as metadata, and `shard(module, mesh)` lays them out with
moejax's rules. Routers that draw random numbers in training (jitter, the DTS
gate) read the `router` stream of the Rngs.

Checked with flax 0.12.8 (Python 3.11) and 0.12.12 (3.12).
"""

from typing import Any, Mapping

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.moe import layer as linen_layer
from moejax.parallel.rules import LOGICAL_AXIS_RULES


class MoELayer(nnx.Module):
  """A sparse FFN [B, L, D] -> ([B, L, D], `moejax.moe.MoEAux`), NNX-style.

  Arguments are those of `moejax.moe.MoELayer` (the router by name, E once),
  plus `d_model` (D, to create the params) and `rngs`.
  """

  def __init__(self, d_model: int, *, num_experts: int, d_ff: int,
               router: str = "switch", top_k: int = 1,
               router_options: Mapping[str, Any] | None = None,
               vocab_size: int = 0, dispatch: str = "capacity",
               capacity_factor: float = 1.25, dtype=jnp.float32,
               matmul: str = "xla", mesh: jax.sharding.Mesh | None = None,
               rngs: nnx.Rngs):
    layer = linen_layer.MoELayer(
        router=router, num_experts=num_experts, d_ff=d_ff, dispatch=dispatch,
        capacity_factor=capacity_factor, dtype=dtype, matmul=matmul, mesh=mesh,
        top_k=top_k, router_options=dict(router_options or {}),
        vocab_size=vocab_size)
    # Variables carry logical names, not mesh shardings: no context needed.
    with nnx.use_eager_sharding(False):
      self.moe = nnx.bridge.ToNNX(layer, rngs=rngs)
      nnx.bridge.lazy_init(self.moe, jnp.zeros((1, num_experts, d_model), dtype),
                           token_ids_BL=jnp.zeros((1, num_experts), jnp.int32))

  def __call__(self, x_BLD: jax.Array, *, token_ids_BL: jax.Array | None = None,
               step: jax.Array | None = None, deterministic: bool = True):
    """`deterministic=False` trains: routers use their `router` rng stream."""
    return self.moe(x_BLD, token_ids_BL=token_ids_BL, step=step,
                    deterministic=deterministic)


def shard(module: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
  """Places `module`'s params on `mesh` by their logical axis names and
  `moejax.parallel.LOGICAL_AXIS_RULES` (experts split over `expert`, the rest
  replicated); returns the module."""
  state = nnx.state(module, nnx.Param)
  shardings = nn.logical_to_mesh_sharding(nnx.get_partition_spec(state), mesh,
                                          LOGICAL_AXIS_RULES)
  nnx.update(module, jax.device_put(state, shardings))
  return module
