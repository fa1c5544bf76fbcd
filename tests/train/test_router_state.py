"""Non-gradient router state (the aux-loss-free expert bias) in the train state:
replicated on the mesh, saved by the checkpoints, bit-exact across a real
`kill -9` and resume."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import PartitionSpec as P

from moejax.metrics.writers import read_metrics
from moejax.models.config import MoEConfig, TransformerConfig
from moejax.models.transformer import TransformerLM
from moejax.parallel import MeshConfig, logical_shardings, make_mesh
from moejax.pytree import path_str
from moejax.train.program import init_state
from moejax.train.optimizer import OptimizerConfig, make_optimizer
from moejax.train.state import state_specs

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = 60
BIAS = "router_state/block_{}/moe/router/balance/expert_bias"

CONFIG = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {str(REPO)!r})
    from tests.conftest import tiny_config


    def get_config():
      c = tiny_config(train__steps={STEPS}, train__checkpoint_every=10,
                      train__log_every=10, train__eval_every={STEPS},
                      train__probe_every=0, model__router="topk",
                      model__top_k=2)
      c.model.moe_layers = "all"
      c.model.router_options = {{"balance": "bias+sequence",
                                 "bias_rate": 0.01, "aux_loss_coef": 1e-3}}
      return c
    """)


def test_bias_state_is_replicated_beside_the_params():
  config = TransformerConfig(
      vocab_size=32, max_len=8, num_layers=2, d_model=16, num_heads=2, d_ff=32,
      moe_layers=(1,), moe=MoEConfig(num_experts=8, top_k=2, router="topk",
                                     router_options=(("balance", "bias"),)))
  model, tx = TransformerLM(config), make_optimizer(OptimizerConfig(), 10)
  abstract = jax.eval_shape(lambda: init_state(model, tx, jax.random.key(0), 8))
  shardings = logical_shardings(state_specs(model, tx, 8), abstract,
                                make_mesh(MeshConfig(2, 4), num_experts=8))
  flat = {path_str(p): s for p, s in
          jax.tree_util.tree_leaves_with_path(shardings)}
  key = "model_state/" + BIAS.format(1)
  assert flat[key].spec == P()  # Every device routes every token with it.
  assert "router_state" not in abstract.params  # Not trained, not decayed.


def _run(config_file, workdir, env):
  return subprocess.Popen(
      [sys.executable, "-m", "moejax.train", "--config", str(config_file),
       "--workdir", str(workdir)], env=env, cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def _finish(process, timeout=900):
  out, _ = process.communicate(timeout=timeout)
  assert process.returncode == 0, out[-3000:]


def _final_state(workdir) -> dict[str, np.ndarray]:
  manager = ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints" /
                                  "stage_0", item_names=("state", "data"))
  state = manager.restore(STEPS, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))["state"]
  manager.close()
  return {path_str(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(state)}


def test_bias_survives_kill_9_and_resume_bit_exactly(tmp_path):
  config_file = tmp_path / "bias_config.py"
  config_file.write_text(CONFIG)
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  straight = _run(config_file, tmp_path / "straight", env)
  _finish(straight)

  killed = _run(config_file, tmp_path / "killed", env)
  first = tmp_path / "killed" / "checkpoints" / "stage_0" / "10"
  deadline = time.monotonic() + 900
  while not first.is_dir() and killed.poll() is None:
    assert time.monotonic() < deadline, "no checkpoint within 900 s"
    time.sleep(0.02)
  killed.send_signal(signal.SIGKILL)
  killed.communicate()
  assert killed.returncode == -signal.SIGKILL  # Killed mid-run, not finished.
  assert not (tmp_path / "killed" / "checkpoints" / "stage_0" / str(STEPS)).exists()
  _finish(_run(config_file, tmp_path / "killed", env))

  want, got = _final_state(tmp_path / "straight"), _final_state(
      tmp_path / "killed")
  assert sorted(want) == sorted(got)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  for layer in (0, 1):
    bias = want["model_state/" + BIAS.format(layer)]
    assert np.abs(bias).max() > 0  # It moved ...
    assert abs(bias.mean()) < 1e-6  # ... recentred to zero mean.
  def rows(workdir):  # Everything but the timings.
    return [{k: v for k, v in r.items() if not k.startswith("perf/")}
            for r in read_metrics(workdir) if "train/loss" in r]
  assert rows(tmp_path / "killed") == rows(tmp_path / "straight")
