"""Multi-process start-up: `jax.distributed.initialize()` only when launched on several.

Call `maybe_initialize()` first thing in the entry point, before anything asks
jax for devices. Launchers recognised (`detect_launcher`):
- explicit: `JAX_COORDINATOR_ADDRESS` (host:port) with `JAX_NUM_PROCESSES` and
  `JAX_PROCESS_ID`;
- SLURM (`srun`): the job/step variables jax's SLURM detection reads, and
  `SLURM_NTASKS` > 1;
- Open MPI (`mpirun`): `OMPI_COMM_WORLD_SIZE` > 1;
- Cloud TPU pods: more than one host in `TPU_WORKER_HOSTNAMES` (or
  `TPU_PROCESS_ADDRESSES`), or `MEGASCALE_NUM_SLICES` > 1.

CPU processes exchange data through gloo collectives: the default of the
supported jax versions (0.10.2, 0.12), set here where a jax has none.
"""

import os
from typing import Mapping

import jax

from moejax.errors import ConfigError

_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
               "SLURM_PROCID", "SLURM_LOCALID")


def _int(env: Mapping[str, str], name: str, default: int = 1) -> int:
  value = env.get(name, "")
  try:
    return int(value) if value.strip() else default
  except ValueError:
    raise ConfigError(f"environment variable {name}={value!r} must be an "
                      "integer; fix or unset it") from None


def detect_launcher(environ: Mapping[str, str] | None = None) -> str | None:
  """`explicit`, `slurm`, `ompi` or `tpu` when run as several processes, else None."""
  env = os.environ if environ is None else environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return None if env.get("JAX_NUM_PROCESSES") == "1" else "explicit"
  if all(v in env for v in _SLURM_VARS) and _int(env, "SLURM_NTASKS") > 1:
    return "slurm"
  if _int(env, "OMPI_COMM_WORLD_SIZE") > 1:
    return "ompi"
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return "tpu"
  if _int(env, "MEGASCALE_NUM_SLICES") > 1:
    return "tpu"
  return None


def maybe_initialize(environ: Mapping[str, str] | None = None) -> bool:
  """Joins the multi-process job when one is detected; True when distributed."""
  env = os.environ if environ is None else environ
  launcher = detect_launcher(env)
  if launcher is None:
    return False
  if jax.distributed.is_initialized():
    return True
  if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (
      None, "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if launcher == "explicit":
    if "JAX_NUM_PROCESSES" not in env or "JAX_PROCESS_ID" not in env:
      raise ConfigError(
          "JAX_COORDINATOR_ADDRESS is set without JAX_NUM_PROCESSES and "
          "JAX_PROCESS_ID; set all three (or none)")
    jax.distributed.initialize(
        coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
        num_processes=_int(env, "JAX_NUM_PROCESSES"),
        process_id=_int(env, "JAX_PROCESS_ID", 0))
  else:
    jax.distributed.initialize()  # jax reads the launcher's variables itself.
  return True
