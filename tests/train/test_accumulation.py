"""Gradient accumulation (`train.grad_accum_steps`): k micro-batches in one
step equal the whole batch where the policy says so (dense, `global`,
`sequence`, the bias and ReMoE's lambda), `aux` is the mean of per-micro-batch
losses, bad sizes are one-line errors, and a resumed run repeats the curve."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.errors import ConfigError
from moejax.metrics.writers import MetricWriter, read_metrics, series
from moejax.models.config import MoEConfig, TransformerConfig
from moejax.models.transformer import TransformerLM
from moejax.parallel import MeshConfig, make_mesh
from moejax.routing.contract import ROUTER_STATE
from moejax.train import make_train_step, parse, train_and_evaluate
from moejax.train.accumulate import micro_batches
from moejax.train.optimizer import OptimizerConfig, make_optimizer
from moejax.train.program import init_state
from tests.conftest import tiny_config

B, L, E = 16, 8, 8  # k = 2: micro-batches of 8 sequences, 1 per device.
STATE = ROUTER_STATE + "/block_1/moe/router"


def _model(router_options=(), router="topk", moe_layers=(1,), mesh=None,
           num_layers=2, scan_layers=False):
  config = TransformerConfig(
      vocab_size=32, max_len=L, num_layers=num_layers, d_model=16, num_heads=2,
      d_ff=32, moe_layers=moe_layers, scan_layers=scan_layers, moe=MoEConfig(
          num_experts=E, top_k=2, router=router, dispatch="dropless",
          router_options=tuple(sorted(dict(router_options).items()))))
  return TransformerLM(config, mesh=mesh)


def _batch(seed=1):
  tokens = jax.random.randint(jax.random.key(seed), (B, L + 1), 0, 32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def _init(model, tx):
  """A fresh state whose router gates are 30x their init: confident routers,
  so that micro-batch and whole-batch statistics differ clearly."""
  state = init_state(model, tx, jax.random.key(0), L)
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v * 30.0 if "gate" in jax.tree_util.keystr(p) else v,
      state.params)
  return state.replace(params=params, opt_state=tx.init(params))


def _steps(model, k, steps=1, tx=None):
  """(state, metrics) after `steps` steps of batch size B in k micro-batches."""
  tx = tx or make_optimizer(OptimizerConfig(), 10)
  state = _init(model, tx)
  step = jax.jit(make_train_step(model, tx, jax.random.key(2),
                                 grad_accum_steps=k))
  for i in range(steps):
    state, metrics = step(state, _batch(i + 1))
  return state, metrics


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a),
                          jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("k", [2, 4])
def test_dense_k_micro_batches_equal_the_whole_batch(k):
  # SGD: the update is -lr * grad, so equal params mean equal gradients.
  model, tx = _model(moe_layers=()), optax.sgd(0.5)
  (s_k, m_k), (s_1, m_1) = _steps(model, k, tx=tx), _steps(model, 1, tx=tx)
  for key in ("train/loss", "train/total_loss", "train/grad_norm",
              "train/param_norm"):
    np.testing.assert_allclose(m_k[key], m_1[key], rtol=1e-5, err_msg=key)
  _assert_same(s_k.params, s_1.params)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                       s_1.params, _init(model, tx).params)
  assert max(jax.tree.leaves(moved)) > 1e-3  # The step did something.


def _assert_accumulates_like_the_whole_batch(model):
  """Two steps in k = 2 micro-batches equal two whole-batch steps: metrics,
  params and router state; returns the accumulated state."""
  (s_2, m_2), (s_1, m_1) = _steps(model, 2, steps=2), _steps(model, 1, steps=2)
  for key in ("train/loss", "train/aux_loss", "router/balance_loss",
              "train/grad_norm"):
    np.testing.assert_allclose(m_2[key], m_1[key], rtol=1e-5, err_msg=key)
  _assert_same(s_2.params, s_1.params)
  _assert_same(s_2.model_state, s_1.model_state)
  return s_2


@pytest.mark.parametrize("balance", ["global", "sequence", "bias+global"])
def test_whole_batch_policies_equal_the_unaccumulated_step_on_a_mesh(balance):
  """`global` counts f_i over the whole accumulated batch (8 devices, k = 2),
  `sequence` is per sequence: both are the whole batch's loss and gradient."""
  mesh = make_mesh(MeshConfig(2, 4), num_experts=E)
  model = _model({"balance": balance, "aux_loss_coef": 0.5}, mesh=mesh)
  _assert_accumulates_like_the_whole_batch(model)


def test_scanned_blocks_accumulate_like_the_whole_batch(balance="bias+global"):
  """Under `model.scan_layers` (one (dense, MoE) unit scanned twice) the
  `batch_counts` collection is stacked per layer like every other one: the
  accumulated step still equals the whole batch's, for the whole-batch loss
  (`global`) and the bias update together."""
  mesh = make_mesh(MeshConfig(2, 4), num_experts=E)
  model = _model({"balance": balance, "aux_loss_coef": 0.5}, mesh=mesh,
                 num_layers=4, moe_layers=(1, 3), scan_layers=True)
  s_2 = _assert_accumulates_like_the_whole_batch(model)
  assert "stack_0" in s_2.params  # The scanned layout, not the unrolled one.


def _micro_aux_losses(model, state, batch, k):
  """Each micro-batch's (aux loss, gradient) computed on its own."""
  def aux_loss(params, mb):
    (_, aux), _ = model.apply(
        {"params": params, **state.model_state}, mb["inputs"],
        deterministic=False, rngs={"router": jax.random.key(3)},
        mutable=[ROUTER_STATE])
    return aux["aux_loss"]
  micro = micro_batches(batch, k)
  return [jax.jit(jax.value_and_grad(aux_loss))(
      state.params, jax.tree.map(lambda a: a[m], micro)) for m in range(k)]


def test_global_differs_from_a_mean_of_micro_batch_losses():
  """What the test above rules out: per-micro-batch `global` losses."""
  model = _model({"balance": "global", "aux_loss_coef": 1.0})
  state = _init(model, optax.sgd(0.1))
  _, m_1 = _steps(model, 1)
  per_micro = [loss for loss, _ in _micro_aux_losses(model, state, _batch(), 2)]
  assert abs(np.mean(per_micro) / m_1["train/aux_loss"] - 1) > 1e-3


def test_aux_is_the_mean_of_per_micro_batch_losses():
  mesh = make_mesh(MeshConfig(2, 4), num_experts=E)
  tx = optax.sgd(1.0)
  model = _model({"balance": "aux", "aux_loss_coef": 1.0, "z_loss_coef": 0.0},
                 mesh=mesh)
  state = _init(model, tx)
  s_2, m_2 = _steps(model, 2, tx=tx)
  per_micro = _micro_aux_losses(model, state, _batch(), 2)
  np.testing.assert_allclose(m_2["train/aux_loss"],
                             np.mean([loss for loss, _ in per_micro]),
                             rtol=1e-5)
  # The router's gate gets gradient from the aux loss and the task loss only;
  # the task loss's gradient is the whole batch's (dense test), so the aux
  # part of the update is the mean of the micro-batches' aux gradients.
  gate = lambda p: p["block_1"]["moe"]["router"]["gate"]["kernel"]  # noqa: E731
  no_aux = _model({"balance": "aux", "aux_loss_coef": 0.0, "z_loss_coef": 0.0},
                  mesh=mesh)
  s_0, _ = _steps(no_aux, 2, tx=tx)
  aux_update = gate(s_2.params) - gate(s_0.params)
  want = -np.mean([gate(g) for _, g in per_micro], axis=0)
  np.testing.assert_allclose(aux_update, want, rtol=1e-4, atol=1e-7)
  _, m_1 = _steps(model, 1, tx=tx)  # One group per device of the whole batch.
  assert abs(m_2["train/aux_loss"] / m_1["train/aux_loss"] - 1) > 1e-3


@pytest.mark.parametrize("router,options,leaf", [
    ("topk", {"balance": "bias+sequence", "bias_rate": 0.01}, "balance/expert_bias"),
    ("remoe", {}, "l1_coef")])
def test_router_state_steps_once_from_the_whole_batch(router, options, leaf):
  model = _model(options, router=router)
  (s_2, _), (s_1, _) = _steps(model, 2), _steps(model, 1)
  def state(s):
    flat = {jax.tree_util.keystr(p): v for p, v in
            jax.tree_util.tree_leaves_with_path(s.model_state)}
    return next(v for p, v in flat.items() if leaf.split("/")[-1] in p)
  np.testing.assert_allclose(state(s_2), state(s_1), rtol=1e-6, atol=1e-9)
  if router == "remoe":  # lambda moved by alpha^(+-1): exactly one update.
    ratio = float(state(s_2)) / 1e-8
    assert min(abs(ratio - 1.2), abs(ratio - 1 / 1.2)) < 1e-5, ratio
  else:  # One step of +-u, recentred: at most u + u from zero.
    bias = np.asarray(state(s_2))
    assert 0 < np.abs(bias).max() <= 0.02 + 1e-6


@pytest.mark.parametrize("overrides,match", [
    ({"train__batch_size": 8, "train__grad_accum_steps": 3},
     "train.batch_size=8 does not split into train.grad_accum_steps=3"),
    ({"train__grad_accum_steps": 0}, "train.grad_accum_steps must be a positive"),
    ({"train__batch_size": 8, "train__grad_accum_steps": 2,
      "mesh__data": 2, "mesh__expert": 4},
     r"train.batch_size=8 / train.grad_accum_steps=2 = 4 sequences per "
     r"micro-batch, not a multiple of the 8 devices")])
def test_bad_accumulation_sizes_are_one_line_errors(overrides, match):
  with pytest.raises(ConfigError, match=match) as err:
    parse(tiny_config(**overrides))
  assert "\n" not in str(err.value)


def test_micro_batches_that_do_not_split_over_the_devices_fail_at_build(
    tmp_path):
  # mesh.data = -1 takes the 8 devices: known only when the mesh is built.
  config = parse(tiny_config(train__batch_size=8, train__grad_accum_steps=2))
  with pytest.raises(ConfigError, match="4 sequences per micro-batch"):
    train_and_evaluate(config, tmp_path, verbose=False)


class _Crash(Exception):
  pass


def test_accumulated_run_resumes_on_the_uninterrupted_curve(tmp_path,
                                                            monkeypatch):
  config = parse(tiny_config(train__steps=20, train__batch_size=16,
                             train__grad_accum_steps=2, train__log_every=1,
                             train__checkpoint_every=10, train__eval_every=20,
                             train__probe_every=0))
  train_and_evaluate(config, tmp_path / "straight", verbose=False)
  real_write = MetricWriter.write

  def crash_at_15(self, step, metrics):
    real_write(self, step, metrics)
    if step == 15:  # After the step-10 checkpoint.
      raise _Crash()

  monkeypatch.setattr(MetricWriter, "write", crash_at_15)
  with pytest.raises(_Crash):
    train_and_evaluate(config, tmp_path / "resumed", verbose=False)
  monkeypatch.setattr(MetricWriter, "write", real_write)
  train_and_evaluate(config, tmp_path / "resumed", verbose=False)
  straight = read_metrics(tmp_path / "straight")
  resumed = read_metrics(tmp_path / "resumed")
  for key in ("train/loss", "train/aux_loss", "eval/loss"):
    s_steps, s_vals = series(straight, key)
    r_steps, r_vals = series(resumed, key)
    assert s_steps == r_steps, key
    np.testing.assert_allclose(r_vals, s_vals, rtol=1e-6, err_msg=key)
  _, losses = series(straight, "train/loss")
  assert losses[-1] < losses[0] - 0.3  # It trains.
