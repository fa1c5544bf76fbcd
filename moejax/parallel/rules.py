"""The one place that says which mesh axes split which arrays.

Shapes: B batch, E experts, D model width, F hidden width.

`LOGICAL_AXIS_RULES` maps logical axis names to mesh axes. The model names the
axes of each param where it creates it (`nn.with_logical_partitioning`, e.g.
`("expert", "embed", "mlp")` for stacked expert weights); activations use
"batch". `logical_shardings` turns a tree of logical PartitionSpecs (from
`nn.get_partition_spec`; `moejax.train.state.state_specs` extends it to the
optimizer state) into NamedShardings. Names that map to None are replicated.

Two rule sets, picked by `mesh.shard_params` (`axis_rules`):
- `LOGICAL_AXIS_RULES` (default): expert weights split over `expert`, every
  other param replicated.
- `SHARDED_AXIS_RULES` (FSDP / ZeRO-3): also every weight's `embed` (D)
  dimension split, over both mesh axes (every device that splits the batch)
  where the array has no `expert` dimension, and over `data` where it has one
  (the `expert` axis is taken). Norm scales (`norm`) stay replicated. Flax
  assigns rules in order, a mesh axis at most once per array, so the second
  `embed` rule is the fallback for expert weights.
"""

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax.errors import ConfigError
from moejax.pytree import path_str

MESH_AXES = ("data", "expert")
EXPERT_AXIS = "expert"

Rules = tuple[tuple[str, Any], ...]

LOGICAL_AXIS_RULES: Rules = (
    ("batch", ("data", "expert")),  # Tokens: split over every device.
    ("layers", None),               # Scanned blocks' leading axis.
    ("expert", "expert"),           # Stacked expert weights [E, ...].
    ("expert_depth", None),         # Deep experts' sublayers [E, n, ...].
    ("vocab", None),
    ("embed", None),
    ("norm", None),                 # Norm scales [D].
    ("mlp", None),
    ("heads", None),
    ("kv", None),
)

# Order matters: `expert` claims its mesh axis before `embed` is assigned.
SHARDED_AXIS_RULES: Rules = (
    ("batch", ("data", "expert")),
    ("layers", None),
    ("expert", "expert"),
    ("expert_depth", None),
    ("embed", ("data", "expert")),  # Non-expert weights: D over every device.
    ("embed", "data"),              # Expert weights: `expert` taken, D over data.
    ("vocab", None),
    ("norm", None),                 # Tiny; a gather per use would cost more.
    ("mlp", None),
    ("heads", None),
    ("kv", None),
)


def axis_rules(shard_params: bool = False) -> Rules:
  """The rule set of `mesh.shard_params`: sharded (FSDP) or replicated params."""
  return SHARDED_AXIS_RULES if shard_params else LOGICAL_AXIS_RULES


def logical_spec(names: tuple[str | None, ...],
                 rules: Rules = LOGICAL_AXIS_RULES) -> P:
  """Mesh PartitionSpec of an array whose dimensions carry these logical names."""
  return nn.logical_to_mesh_axes(names, rules)


TOKEN_AXES: tuple[str, ...] = tuple(logical_spec(("batch",))[0])


def _axes_size(mesh: jax.sharding.Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return int(np.prod([mesh.shape[a] for a in axes]))


def _checked_spec(path: str, logical: P | None, shape: tuple[int, ...],
                  mesh: jax.sharding.Mesh, rules: Rules) -> P:
  """The mesh PartitionSpec of one leaf; ConfigError if the mesh cannot split it."""
  names = tuple(logical) if logical is not None else ()
  spec = logical_spec(names, rules) if names else P()
  for dim, (size, axes) in enumerate(zip(shape, spec)):
    parts = _axes_size(mesh, axes)
    if size % parts:
      raise ConfigError(
          f"{path} has size {size} in dim {dim}, not divisible by mesh axes "
          f"{axes} of size {parts}; choose mesh sizes that divide it"
          + ("" if rules is LOGICAL_AXIS_RULES else
             " or set mesh.shard_params=False"))
  return spec if any(axes is not None for axes in spec) else P()


def logical_shardings(specs, abstract, mesh: jax.sharding.Mesh,
                      rules: Rules = LOGICAL_AXIS_RULES):
  """NamedShardings on `mesh` for `abstract` (arrays or ShapeDtypeStructs) whose
  leaves carry the logical PartitionSpecs of `specs` (same tree; a None or
  empty spec is replicated), by `rules` (`axis_rules`)."""
  def one(path, spec, leaf):
    return NamedSharding(mesh, _checked_spec(path_str(path), spec,
                                             np.shape(leaf), mesh, rules))
  return jax.tree_util.tree_map_with_path(
      one, specs, abstract, is_leaf=lambda x: x is None or isinstance(x, P))


def with_shardings(abstract_state, shardings):
  """ShapeDtypeStructs carrying `shardings`: the target of a checkpoint restore."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, shardings)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dimension split over `data` and `expert`, the rest whole."""
  return NamedSharding(mesh, P(TOKEN_AXES))


def shard_batch(batch, mesh: jax.sharding.Mesh):
  """Global arrays split over every device from the global batch [B, ...].

  Every process passes the same whole batch and places only the rows its own
  devices hold, whatever devices it owns.
  """
  sharding = batch_sharding(mesh)
  shards = _axes_size(mesh, TOKEN_AXES)

  def check(x):
    if np.ndim(x) == 0:
      raise ConfigError("shard_batch got a scalar; batch leaves need a batch dim")
    if np.shape(x)[0] % shards:
      raise ConfigError(
          f"global batch of {np.shape(x)[0]} rows does not split over {shards} "
          f"devices (mesh {dict(mesh.shape)}); make train.batch_size a multiple "
          f"of {shards}")
  jax.tree.map(check, batch)
  return jax.device_put(batch, sharding)
