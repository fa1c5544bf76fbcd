"""The stage machine's plan of a stage: its segments, the init transform of its
fresh state, and a trainer that compiles and initialises what they say, naming
no router."""

import ast
import dataclasses
import pathlib
import types

import jax
import numpy as np
import pytest

import moejax.train
from moejax.models import TransformerLM
from moejax.routing import frequency_balanced_table
from moejax.stages.plan import init_transform, segment_at, segments
from moejax.train import parse
from moejax.train.optimizer import make_optimizer
from moejax.train.program import build_program, init_state, run_keys
from tests.conftest import tiny_config


def _stage(router: str, **options):
  c = tiny_config(train__steps=20)
  c.model.router = router
  c.model.router_options = options
  c.model.dispatch = "dropless"
  return parse(c)


def test_one_segment_without_phases_or_moe_layers():
  stage = _stage("switch").stages[0]
  assert segments(stage) == ((0, stage.model),)
  dense = dataclasses.replace(stage, model=dataclasses.replace(
      stage.model, moe_layers=()))
  assert segments(dense) == ((0, dense.model),)
  assert init_transform(dense.model) is None


def test_dts_stage_splits_at_hard_step():
  stage = _stage("dts", hard_step=12, anneal_steps=20).stages[0]
  (first, soft), (second, hard) = segments(stage)
  assert (first, second) == (0, 12) and soft is stage.model
  assert dict(hard.moe.router_options)["hard_step"] == -1


def test_segment_at_takes_the_last_segment_started():
  plan = ((0, "soft"), (12, "hard"))
  # Stage step 11 is the update to step 12, still soft; from 12 on, hard.
  assert [segment_at(plan, s) for s in (0, 11, 12, 19)] == [
      "soft", "soft", "hard", "hard"]


@pytest.mark.parametrize("router,options,has", [
    ("hash", {"balance": "frequency"}, True), ("hash", {}, False),
    ("switch", {}, False), ("dts", {"hard_step": 5}, False)])
def test_only_data_dependent_router_state_has_an_init_transform(router,
                                                                options, has):
  model = _stage(router, **options).stages[0].model
  assert (init_transform(model) is not None) == has


def _data(counts_V):
  """What `build_program` reads of a run's data: token counts, eval batches."""
  return types.SimpleNamespace(token_counts=counts_V, eval_batches=[])


@pytest.mark.parametrize("balance", ["frequency", "random"])
def test_fresh_stage_state_gets_its_init_transform(balance):
  """A stage program's fresh state: Hash's table balanced on the corpus
  counts with `frequency`; the table init drew, without."""
  config = _stage("hash", balance=balance)
  counts_V = np.random.default_rng(0).zipf(1.5, 512) % 1000
  init_rng, step_rng = run_keys(config.train.seed)
  program = build_program(config, 0, _data(counts_V), init_rng, step_rng)
  state = program.init()
  tables = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(
      state.model_state) if "hash_table" in jax.tree_util.keystr(path)]
  assert len(tables) == 1  # MoE in block 1 of 2.
  model = config.stages[0].model
  want_V = frequency_balanced_table(counts_V, model.moe.num_experts)
  drawn = init_state(TransformerLM(model), make_optimizer(
      config.optim, config.train.steps, ()), init_rng, config.data.seq_len)
  drawn_V = jax.tree.leaves(drawn.model_state)[0]
  if balance == "frequency":
    np.testing.assert_array_equal(tables[0], want_V)
    assert np.any(np.asarray(drawn_V) != want_V)
  else:
    np.testing.assert_array_equal(tables[0], drawn_V)


# The trainer's modules that may read routing: the config validates a router's
# name and options (`check_router`), presets name the compared methods.
_MAY_NAME_ROUTERS = {"config.py", "presets.py"}
# What else of `moejax.routing` the trainer may read: the router-state
# collection's name (the step keeps it mutable) and probe replay.
_ROUTING_MODULES = {"moejax.routing.contract", "moejax.routing.replay"}


def test_the_trainer_names_no_router():
  """Outside the config and presets, `moejax.train` imports no router, no
  registry and no router hook: what changes a run's program or its state
  comes from the stage machine."""
  found = []
  for path in pathlib.Path(moejax.train.__file__).parent.glob("*.py"):
    if path.name in _MAY_NAME_ROUTERS:
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and (
          node.module == "moejax.routing" or
          node.module.startswith("moejax.routing.")) and (
              node.module not in _ROUTING_MODULES):
        found.append(f"{path.name}: from {node.module}")
      if isinstance(node, ast.Attribute) and node.attr in (
          "phases", "init_transform", "router_class"):
        found.append(f"{path.name}: .{node.attr}")
  assert not found, found
