"""make_mesh shapes and errors, the layer's shape checks, multi-process detection."""

import jax
import pytest

from moejax.errors import ConfigError
from moejax.parallel import (MeshConfig, detect_launcher, is_main_process,
                             make_mesh, maybe_initialize)
from moejax.parallel.expert_parallel import check_mesh


@pytest.mark.parametrize("cfg,num_experts,shape", [
    (MeshConfig(), 8, (8, 1)),
    (MeshConfig(data=-1, expert=8), 8, (1, 8)),
    (MeshConfig(data=2, expert=-1), 16, (2, 4)),
    (MeshConfig(data=4, expert=2), 6, (4, 2)),
])
def test_make_mesh_shapes(cfg, num_experts, shape):
  mesh = make_mesh(cfg, num_experts=num_experts)
  assert mesh.axis_names == ("data", "expert")
  assert (mesh.shape["data"], mesh.shape["expert"]) == shape
  assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}


def test_make_mesh_on_some_devices():
  mesh = make_mesh(MeshConfig(expert=2), num_experts=4, devices=jax.devices()[:4])
  assert dict(mesh.shape) == {"data": 2, "expert": 2}


@pytest.mark.parametrize("cfg,num_experts,match", [
    (MeshConfig(data=3, expert=4), 8, r"= 12 devices, but 8 are available"),
    (MeshConfig(data=-1, expert=3), 6, r"8 devices do not split"),
    (MeshConfig(data=-1, expert=-1), 8, r"both -1"),
    (MeshConfig(data=0, expert=8), 8, r"mesh.data=0 must be positive"),
    (MeshConfig(data=-2, expert=4), 8, r"mesh.data=-2 must be positive"),
    (MeshConfig(data=2.0, expert=4), 8, r"mesh.data=2.0 must be an integer"),
    (MeshConfig(data=-1, expert=8), 4, r"num_experts=4 is not divisible by "
                                       r"mesh.expert=8"),
    (MeshConfig(data=-1, expert=1), 0, r"num_experts=0 must be positive"),
])
def test_make_mesh_errors(cfg, num_experts, match):
  with pytest.raises(ConfigError, match=match) as err:
    make_mesh(cfg, num_experts=num_experts)
  assert "\n" not in str(err.value)


def test_layer_shape_checks():
  mesh = make_mesh(MeshConfig(2, 4), num_experts=8)
  assert check_mesh(mesh, num_tokens=64, num_experts=8) == (4, 8)
  with pytest.raises(ConfigError, match=r"60 tokens .* do not split over 8"):
    check_mesh(mesh, num_tokens=60, num_experts=8)
  with pytest.raises(ConfigError, match=r"num_experts=6 is not divisible"):
    check_mesh(mesh, num_tokens=64, num_experts=6)
  other = jax.make_mesh((8,), ("batch",),
                        axis_types=(jax.sharding.AxisType.Auto,))
  with pytest.raises(ConfigError, match=r"needs a mesh with axes"):
    check_mesh(other, num_tokens=64, num_experts=8)


_SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]",
          "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("env,launcher", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "0"}, "explicit"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "1"}, None),
    ({**_SLURM, "SLURM_NTASKS": "4"}, "slurm"),
    ({**_SLURM, "SLURM_NTASKS": "1"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, None),  # salloc shell, no srun.
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "ompi"),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, None),
    ({"MEGASCALE_NUM_SLICES": "2"}, "tpu"),
])
def test_detect_launcher(env, launcher):
  assert detect_launcher(env) == launcher


def test_single_process_does_not_initialize():
  assert maybe_initialize({}) is False
  assert is_main_process()
  with pytest.raises(ConfigError, match=r"without JAX_NUM_PROCESSES"):
    maybe_initialize({"JAX_COORDINATOR_ADDRESS": "h:1234"})
  with pytest.raises(ConfigError, match=r"OMPI_COMM_WORLD_SIZE='x' must be"):
    detect_launcher({"OMPI_COMM_WORLD_SIZE": "x"})


def test_explicit_sizes_may_use_fewer_devices():
  mesh = make_mesh(MeshConfig(data=1, expert=2), num_experts=4)
  assert mesh.shape == {"data": 1, "expert": 2}
  assert list(mesh.devices.flat) == jax.devices()[:2]
