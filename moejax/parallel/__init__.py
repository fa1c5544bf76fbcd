"""Data and expert parallelism on a `("data", "expert")` device mesh.

  MeshConfig(data=-1, expert=1)          axis sizes; -1 takes the remaining devices
  make_mesh(cfg, *, num_experts, devices=None) -> Mesh with Auto axes
  LOGICAL_AXIS_RULES                     logical axis name -> mesh axes (the one table)
  SHARDED_AXIS_RULES, axis_rules(shard_params)  the FSDP table and the choice
  logical_shardings(specs, abstract, mesh, rules)  NamedShardings from logical specs
  with_shardings(abstract_state, shardings)  restore targets for orbax
  batch_sharding(mesh), shard_batch(batch, mesh)  the batch split over all devices
  expert_parallel_ffn(x_TD, routing, w_in, w_out, *, mesh, dispatch_path, ...)
                                         shard_map dispatch -> experts -> combine
                                         (used by `MoELayer(mesh=...)`)
  maybe_initialize()                     multi-process start-up
  hosts                                  which process writes, barriers, host values
                                         (`is_main_process()` is `hosts.is_writer()`)

Tokens are split over every device; expert weights over `expert` only, unless
`mesh.shard_params` also splits params and moments (FSDP). The
router sees all tokens; dispatch, expert FFNs and combine run per device, with
capacity counted per device (see `expert_parallel`).

Shapes: T tokens, D model width.
"""

from moejax.parallel import hosts
from moejax.parallel.distributed import detect_launcher, maybe_initialize
from moejax.parallel.expert_parallel import (default_exchange,
                                             dense_ragged_all_to_all,
                                             expert_parallel_ffn, local_capacity)
from moejax.parallel.mesh import MeshConfig, make_mesh
from moejax.parallel.rules import (EXPERT_AXIS, LOGICAL_AXIS_RULES, MESH_AXES,
                                   SHARDED_AXIS_RULES, TOKEN_AXES, axis_rules,
                                   batch_sharding, logical_shardings,
                                   logical_spec, shard_batch, with_shardings)

is_main_process = hosts.is_writer

__all__ = [
    "EXPERT_AXIS", "LOGICAL_AXIS_RULES", "MESH_AXES", "MeshConfig",
    "SHARDED_AXIS_RULES", "TOKEN_AXES", "axis_rules", "batch_sharding",
    "default_exchange", "dense_ragged_all_to_all",
    "detect_launcher", "expert_parallel_ffn", "hosts", "is_main_process",
    "local_capacity", "logical_shardings", "logical_spec", "make_mesh",
    "maybe_initialize", "shard_batch", "with_shardings",
]
