"""The device mesh: a `data` axis (batch only) and an `expert` axis (batch and experts).

Shapes: E experts, N devices on the `expert` axis.

Tokens are split over both axes; expert weights are split over `expert` and
replicated over `data` (with `shard_params`, also split over `data` at rest and
gathered over it for use), so the all-to-all of the expert-parallel layer stays
inside one `data` row. `data` is the outer (slower-varying) axis, so on
multi-host machines the all-to-all runs between neighbouring devices.
"""

import dataclasses
from typing import Sequence

import jax
import numpy as np

from moejax.errors import ConfigError
from moejax.parallel.hosts import check_mesh_processes
from moejax.parallel.rules import MESH_AXES


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; one of them may be -1 (all remaining devices).

  Attributes:
    data: devices that split the batch only.
    expert: devices that split the batch and the experts (N; E % N == 0).
    shard_params: split params and optimizer moments over the devices too
      (FSDP / ZeRO-3, `moejax.parallel.rules.SHARDED_AXIS_RULES`); False
      replicates every non-expert param.
  """

  data: int = -1
  expert: int = 1
  shard_params: bool = False

  def validate(self) -> None:
    """ConfigError for sizes that fit no device count (checked without devices)."""
    for name, size in (("data", self.data), ("expert", self.expert)):
      if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise ConfigError(
            f"mesh.{name}={size!r} must be an integer (a device count, or -1 for "
            "the remaining devices)")
      if size == 0 or size < -1:
        raise ConfigError(
            f"mesh.{name}={size} must be positive, or -1 for the remaining devices")
    if not isinstance(self.shard_params, bool):
      raise ConfigError(
          f"mesh.shard_params={self.shard_params!r} must be True or False")
    if self.data == -1 and self.expert == -1:
      raise ConfigError(
          "mesh.data and mesh.expert are both -1; give one of them a size")

  def shape(self, num_devices: int) -> tuple[int, int]:
    """(data, expert) with -1 resolved (-1 takes all remaining devices; explicit
    sizes may use fewer than are available); ConfigError when it cannot fit."""
    self.validate()
    sizes = {"data": self.data, "expert": self.expert}
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if -1 in sizes.values():
      if num_devices % known:
        raise ConfigError(
            f"{num_devices} devices do not split into mesh axes of size {known}; "
            f"set mesh sizes whose product divides {num_devices}")
      fill = num_devices // known
      return (fill if self.data == -1 else self.data,
              fill if self.expert == -1 else self.expert)
    if known > num_devices:
      raise ConfigError(
          f"mesh.data={self.data} x mesh.expert={self.expert} = {known} devices, "
          f"but {num_devices} are available; make the product at most "
          f"{num_devices} or set one axis to -1")
    return self.data, self.expert


def make_mesh(cfg: MeshConfig, *, num_experts: int,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A `("data", "expert")` mesh with Auto axes over `devices` (default: all).

  Auto axes let `jax.jit` reshard freely and Flax logical constraints work; the
  expert-parallel layer's `shard_map` is explicit about its own layout. In a
  multi-process run every process must own devices in the mesh (ConfigError).
  """
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ConfigError("make_mesh got no devices; pass devices=None for all")
  data, expert = cfg.shape(len(devices))
  devices = devices[:data * expert]  # Explicit sizes may use fewer devices.
  check_mesh_processes(devices, data=data, expert=expert)
  if isinstance(num_experts, bool) or num_experts < 1:
    raise ConfigError(f"num_experts={num_experts} must be positive")
  if num_experts % expert:
    raise ConfigError(
        f"model.num_experts={num_experts} is not divisible by mesh.expert="
        f"{expert}; use a mesh.expert that divides the number of experts")
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh((data, expert), MESH_AXES, axis_types=auto,
                       devices=devices)
