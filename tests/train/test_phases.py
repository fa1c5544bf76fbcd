"""Segments: a stage whose router changes sparsity at a known step (the DTS
gate's hard phase) is split by the stage machine into segments, the trainer
runs one compiled train step per segment, and the cheaper segment's step is the
E-slot step, exactly."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from moejax.models import TransformerLM
from moejax.stages.plan import segments
from moejax.train import make_train_step, parse, train_and_evaluate
from moejax.train.optimizer import make_optimizer
from moejax.train.program import init_state
from tests.conftest import tiny_config

HARD_STEP = 8


def _dts_config(steps=16):
  c = tiny_config(train__steps=steps, train__log_every=1,
                  train__eval_every=steps, train__checkpoint_every=steps)
  c.model.router = "dts"
  c.model.router_options = {"hard_step": HARD_STEP, "anneal_steps": steps}
  c.model.dispatch = "dropless"
  return parse(c)


def test_segments_override_only_the_hard_phase():
  config = _dts_config()
  stage = config.stages[0]
  model = stage.model
  (s0, soft), (s1, hard) = segments(stage)
  assert (s0, s1) == (0, HARD_STEP)
  assert soft is model
  assert dict(hard.moe.router_options)["hard_step"] == -1
  assert {k: v for k, v in hard.moe.router_options if k != "hard_step"} == {
      k: v for k, v in model.moe.router_options if k != "hard_step"}
  # A stage that ends before hard_step has the soft phase only.
  assert segments(dataclasses.replace(stage, steps=HARD_STEP)) == ((0, model),)


def test_hard_phase_step_equals_the_e_slot_step():
  """From one state at a hard-phase step, the phase's compiled step and the
  E-slot model's step give the same loss, metrics and new params."""
  config = _dts_config()
  model_config = config.stages[0].model
  _, hard_config = segments(config.stages[0])[1]
  tx = make_optimizer(config.optim, config.train.steps, ())
  e_slot, hard = TransformerLM(model_config), TransformerLM(hard_config)
  state = init_state(e_slot, tx, jax.random.key(0), config.data.seq_len)
  state = state.replace(step=jnp.int32(HARD_STEP + 3))
  tokens = jax.random.randint(jax.random.key(1), (8, 33), 0, 512)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  out = {name: jax.jit(make_train_step(m, tx, jax.random.key(2)))(state, batch)
         for name, m in (("e_slot", e_slot), ("hard", hard))}
  (s_e, m_e), (s_h, m_h) = out["e_slot"], out["hard"]
  assert float(m_h["router/experts_per_token"]) == 1.0
  for key in ("train/loss", "train/aux_loss", "train/grad_norm"):
    np.testing.assert_allclose(m_h[key], m_e[key], rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(s_h.params), jax.tree.leaves(s_e.params),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_training_switches_to_the_one_slot_step_at_hard_step(tmp_path):
  train_and_evaluate(_dts_config(), tmp_path, verbose=False)
  rows = [json.loads(line) for line in
          (tmp_path / "metrics.jsonl").read_text().splitlines()]
  per_token = {r["step"]: r["router/experts_per_token"] for r in rows
               if "router/experts_per_token" in r}
  assert sorted(per_token) == list(range(1, 17))
  # Soft: several experts above the threshold at tau ~ 1; hard: one.
  assert all(per_token[s] > 1.5 for s in range(1, HARD_STEP + 1)), per_token
  assert all(per_token[s] == 1.0 for s in range(HARD_STEP + 1, 17)), per_token
  assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
