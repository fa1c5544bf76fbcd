"""The one place that says which mesh axes split which arrays.

Shapes: B batch, E experts, D model width, F hidden width.

Two short tables:
- `LOGICAL_AXIS_RULES`: logical axis name (as the model annotates its params with
  `nn.with_logical_partitioning`, plus "batch" for activations) -> mesh axes.
- `PARAM_RULES`: regex over a param's `/`-joined path -> its logical axis names.
  The train state holds plain (unboxed) dicts, so paths are what `state_shardings`
  can see; a test checks these agree with the model's own annotations. The same
  regexes match the optimizer state, whose moments mirror the params' paths.

Everything not named here is replicated.
"""

import re
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax.errors import ConfigError
from moejax.pytree import path_str

MESH_AXES = ("data", "expert")
EXPERT_AXIS = "expert"

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "expert")),  # Tokens: split over every device.
    ("expert", "expert"),           # Stacked expert weights [E, ...].
    ("vocab", None),
    ("embed", None),
    ("mlp", None),
    ("heads", None),
    ("kv", None),
)

PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"(^|/)experts/w_in$", ("expert", "embed", "mlp")),    # [E, D, F]
    (r"(^|/)experts/w_out$", ("expert", "mlp", "embed")),   # [E, F, D]
)


def logical_spec(names: tuple[str | None, ...]) -> P:
  """Mesh PartitionSpec of an array whose dimensions carry these logical names."""
  return nn.logical_to_mesh_axes(names, LOGICAL_AXIS_RULES)


TOKEN_AXES: tuple[str, ...] = tuple(logical_spec(("batch",))[0])


def param_logical_axes(path: str, ndim: int) -> tuple[str | None, ...] | None:
  """Logical names of the first rule matching `path` with the same rank, else None."""
  for pattern, names in PARAM_RULES:
    if len(names) == ndim and re.search(pattern, path):
      return names
  return None


def _axes_size(mesh: jax.sharding.Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return int(np.prod([mesh.shape[a] for a in axes]))


def leaf_spec(path: str, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
  """The PartitionSpec of one state leaf; ConfigError if the mesh cannot split it."""
  names = param_logical_axes(path, len(shape))
  if names is None:
    return P()
  spec = logical_spec(names)
  for dim, (size, axes) in enumerate(zip(shape, spec)):
    parts = _axes_size(mesh, axes)
    if size % parts:
      raise ConfigError(
          f"{path} has size {size} in dim {dim}, not divisible by mesh axes "
          f"{axes} of size {parts}; choose mesh sizes that divide it")
  return spec


def state_shardings(abstract_state, mesh: jax.sharding.Mesh):
  """NamedShardings for a train state (or any pytree of arrays / ShapeDtypeStructs).

  Expert weights and the optimizer moments that mirror them are split over the
  `expert` axis; everything else (other params, scalars, counts) is replicated.
  """
  def one(path, leaf):
    return NamedSharding(mesh, leaf_spec(path_str(path), np.shape(leaf), mesh))
  return jax.tree_util.tree_map_with_path(one, abstract_state)


def with_shardings(abstract_state, shardings):
  """ShapeDtypeStructs carrying `shardings`: the target of a checkpoint restore."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, shardings)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dimension split over `data` and `expert`, the rest whole."""
  return NamedSharding(mesh, P(TOKEN_AXES))


def shard_batch(batch, mesh: jax.sharding.Mesh):
  """Global arrays from each process's rows of the batch (leading dim B_local).

  On one process B_local = B; on P processes each passes its own B / P rows
  (e.g. rows `process_index * B/P ...`), and the global batch is their stack.
  """
  sharding = batch_sharding(mesh)
  shards = _axes_size(mesh, TOKEN_AXES)

  def put(x):
    if np.ndim(x) == 0:
      raise ConfigError("shard_batch got a scalar; batch leaves need a batch dim")
    rows = np.shape(x)[0] * jax.process_count()
    if rows % shards:
      raise ConfigError(
          f"global batch of {rows} rows does not split over {shards} devices "
          f"(mesh {dict(mesh.shape)}); make train.batch_size a multiple of "
          f"{shards}")
    if jax.process_count() == 1 and isinstance(x, jax.Array):
      return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return jax.tree.map(put, batch)
