"""`moejax.parallel.hosts` in one process (the two-process behaviour runs in
tests/multihost): host values of sharded arrays, main_first, the mesh check."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax.errors import ConfigError, DataError
from moejax.parallel import MeshConfig, batch_sharding, hosts, make_mesh


def test_fetch_gives_numpy_values_of_sharded_and_replicated_arrays():
  mesh = make_mesh(MeshConfig(2, 4), num_experts=8)
  x = jnp.arange(16.0).reshape(8, 2)
  tree = {"sharded": jax.device_put(x, batch_sharding(mesh)),
          "replicated": jax.device_put(x, NamedSharding(mesh, P())),
          "scalar": jnp.float32(3)}
  out = hosts.fetch(tree)
  for key in ("sharded", "replicated"):
    assert isinstance(out[key], np.ndarray)
    np.testing.assert_array_equal(out[key], x)
  assert out["scalar"] == 3


def test_main_first_on_one_process_runs_once_and_raises_as_is():
  calls = []
  assert hosts.main_first(lambda: calls.append(1) or "built", name="x") == "built"
  assert calls == [1] and hosts.is_writer()

  def fail():
    raise DataError("corpus is empty; add text")
  with pytest.raises(DataError, match="corpus is empty"):
    hosts.main_first(fail, name="x")


def _devices(*owners):
  return [types.SimpleNamespace(process_index=p) for p in owners]


def test_every_process_must_own_devices_in_the_mesh():
  hosts.check_mesh_processes(_devices(0, 0, 1, 1), data=1, expert=4,
                             num_processes=2, total_devices=4)
  with pytest.raises(ConfigError) as info:
    hosts.check_mesh_processes(_devices(0, 0, 0, 0), data=1, expert=4,
                               num_processes=2, total_devices=8)
  assert str(info.value) == (
      "mesh.data=1 x mesh.expert=4 uses 4 of 8 devices, so process 1 of 2 (4 "
      "devices each) would own none; every process must own devices in the "
      "mesh: make mesh.data x mesh.expert = 8 (or set one of them to -1)")
  with pytest.raises(ConfigError, match="processes 2, 3 of 4"):
    hosts.check_mesh_processes(_devices(0, 1), data=1, expert=2,
                               num_processes=4, total_devices=8)
