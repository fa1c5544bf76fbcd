"""Simulate 8 CPU devices before jax is imported anywhere in the test session,
and keep the data cache and the XLA compilation cache of the session in
temporary directories.

`MOEJAX_TEST_ACCELERATOR=1` leaves the platform to JAX (the lent accelerator:
`benchmarks/device_check.sh` runs `tests/kernels` so, where the Pallas kernels
compile for the chip); only tests that need no 8-device mesh are meant to run
so.
"""

import atexit
import os
import shutil
import tempfile

if os.environ.get("MOEJAX_TEST_ACCELERATOR") != "1":
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") +
      " --xla_force_host_platform_device_count=8").strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Runs that leave data.cache_dir unset share this session's cache (so the tiny
# corpus is prepared once per test process), never the user's ~/.cache/moejax.
os.environ["MOEJAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="moejax-test-cache-")
atexit.register(shutil.rmtree, os.environ["MOEJAX_CACHE_DIR"], True)
# One persistent XLA compilation cache per test session, made by the first
# process (pytest itself: the xdist workers and every subprocess a test starts,
# the CLI and two-process runs, inherit it): a program compiled again (the
# same tiny config in another test, a resumed run, a one-process reference)
# is read back instead. Results are the same executable's.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix="moejax-test-xla-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pathlib  # noqa: E402

import pytest  # noqa: E402

from moejax.train.config import default_config, stage_config  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data():
  """The shared text corpora beside the checkout; skips where they are absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"shared corpora not found at {SHARED_DATA}")
  return SHARED_DATA


def tiny_sizes(c):
  """`c` with the tiny model's widths (2 blocks, D = 32, F = 64) and data (the
  embedded corpus, 150 KB, V = 512, sequences of 32 tokens)."""
  c.model.num_layers = 2
  c.model.d_model = 32
  c.model.num_heads = 2
  c.model.d_ff = 64
  c.data.source = "embedded"
  c.data.max_bytes = 150_000
  c.data.vocab_size = 512
  c.data.seq_len = 32
  return c


def tiny_config(**overrides):
  """A 2-block MoE LM on 150 KB of the embedded corpus: seconds per run."""
  c = tiny_sizes(default_config())
  c.model.num_experts = 4
  c.model.moe_layers = "every_other"
  c.data.eval_batches = 2
  c.train.batch_size = 8
  c.train.steps = 40
  c.train.log_every = 5
  c.train.eval_every = 20
  c.train.checkpoint_every = 20
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 5
  for dotted, value in overrides.items():
    section, key = dotted.split("__")
    c[section][key] = value
  return c


@pytest.fixture
def tiny():
  return tiny_config


def tiny_stablemoe(**overrides):
  """The tiny model as StableMoE: MoE block 1, stage `distill` of 10 steps then
  `frozen` (freeze_distilled_router) for the rest of `train.steps` (default 30)."""
  overrides = {"train__steps": 30, **overrides}
  c = tiny_config(**overrides)
  c.model.moe_layers = "1"
  c.model.router = "stablemoe"
  c.model.router_options = {"distill_dim": 8}
  c.stages = [stage_config("distill", steps=10),
              stage_config("frozen", transform="freeze_distilled_router",
                           model={"router_options": {"stage": 2}})]
  return c


def checkpoint_params(workdir, stage: int, step: int) -> dict:
  """The params saved at `step` in `<workdir>/checkpoints/stage_<stage>`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints" /
                                  f"stage_{stage}", item_names=("state", "data"))
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))["state"]
  manager.close()
  return state["params"]


def assert_matches_loop(fast, naive, params, grad_reference=None):
  """`fast(params)` equals the naive per-token loop `naive(params)`, and the
  gradients of sum(y^2) equal those of `grad_reference` (default: the loop;
  pass a layer already checked against the loop where differentiating the
  loop would be slow). Tolerances: float32, values 1e-5, gradients 1e-4."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  np.testing.assert_allclose(jax.jit(fast)(params), naive(params), rtol=1e-5,
                             atol=1e-5)
  g_fast = jax.jit(jax.grad(lambda p: jnp.sum(fast(p) ** 2)))(params)
  if grad_reference is None:
    g_ref = jax.grad(lambda p: jnp.sum(naive(p) ** 2))(params)
  else:
    g_ref = jax.jit(jax.grad(lambda p: jnp.sum(grad_reference(p) ** 2)))(params)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
