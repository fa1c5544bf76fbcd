"""One stage of a run as a program: its mesh, model, optimizer, jitted train,
eval and probe steps, and the shardings of its state.

Shapes: B batch, L length.

`build_program(config, index, data, init_rng, step_rng)` builds stage `index`;
the loop (`moejax.train.loop`) runs the programs one after another. It
compiles what the stage machine says (`moejax.stages.plan`): one jitted train
step per segment of the stage, over the same params and state, and a fresh
state with its init transform applied.
"""

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax.data.rows import place_rows
from moejax.models.encdec import make_model
from moejax.models.transformer import init_variables
from moejax.moe.routed import token_shards
from moejax.parallel import hosts
from moejax.parallel.mesh import make_mesh
from moejax.parallel.rules import (axis_rules, batch_sharding, logical_shardings,
                                   shard_batch)
from moejax.stages.plan import init_transform, segment_at, segments
from moejax.stages.stage import Stage, boundaries
from moejax.train.config import RunConfig, check_micro_batch
from moejax.train.inputs import example_inputs, model_inputs
from moejax.train.optimizer import make_optimizer
from moejax.train.state import TrainState, state_specs
from moejax.train.step import make_eval_step, make_probe_step, make_train_step


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(init key, step key) of a run with `train.seed = seed`: every stage's
  fresh params come from the init key, so anyone can redraw a run's init."""
  init_rng, step_rng = jax.random.split(jax.random.key(seed))
  return init_rng, step_rng


def init_state(model: nn.Module, tx: optax.GradientTransformation,
               rng: jax.Array, seq_len: int, target_len: int | None = None
               ) -> TrainState:
  """Fresh variables (logical-axis boxes removed) and optimizer state at step 0
  (the model initialised on zero ids of `seq_len`; an encoder-decoder's target
  of `target_len`)."""
  variables = init_variables(model, rng,
                             *example_inputs(model.config, seq_len, target_len))
  params = variables.pop("params")
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), model_state=variables)


class Evaluator:
  """Mean loss of the scored tokens, perplexity and token accuracy over a
  fixed set of held-out batches."""

  def __init__(self, model: nn.Module, batches):
    self._step = jax.jit(make_eval_step(model))
    self._batches = batches

  def __call__(self, variables) -> dict[str, float]:
    totals = None
    for batch in self._batches:
      out = self._step(variables, model_inputs(batch))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = hosts.fetch(totals)
    loss = float(totals["loss_sum"] / totals["tokens"])
    return {"eval/loss": loss,
            "eval/ppl": math.exp(loss) if loss < 700 else float("inf"),
            "eval/accuracy": float(totals["correct"] / totals["tokens"])}


@dataclasses.dataclass
class StageProgram:
  """The jitted functions of one stage, its shardings and the global steps it
  covers. `train_steps` holds (first global step, jitted step) per segment
  of the stage (`moejax.stages.plan.segments`), ascending; `train_step(step)`
  picks one."""

  index: int
  stage: Stage
  start: int
  end: int
  mesh: jax.sharding.Mesh
  init: Callable[[], TrainState]
  abstract: TrainState
  shardings: Any
  train_steps: tuple[tuple[int, Callable], ...]
  evaluate: Evaluator
  probe: Callable | None

  def train_step(self, step: int) -> Callable:
    """The jitted step that takes the state from `step` - 1 to `step`."""
    return segment_at(self.train_steps, step - 1)

  def place(self, state: TrainState) -> TrainState:
    """`state` laid out on this stage's mesh (after an eager transform)."""
    return hosts.place(state, self.shardings)

  def batch(self, batch) -> dict:
    """The global batch (every process holds it whole) as a global array on the
    mesh; each process places the rows of its own devices."""
    return shard_batch(model_inputs(batch), self.mesh)

  def train_batch(self, data, i: int) -> dict:
    """Training batch i as global arrays, this process reading only its rows."""
    sharding = batch_sharding(self.mesh)
    try:
      sharding.shard_shape((data.batch_size,))
    except ValueError:  # shard_batch's one-line error for rows that do not split.
      shard_batch({"rows": np.zeros(data.batch_size, np.int8)}, self.mesh)
    return place_rows(lambda rows: model_inputs(data.train_rows(i, rows)),
                      data.batch_size, sharding)


def stage_mesh(config: RunConfig, index: int) -> jax.sharding.Mesh:
  """The (data, expert) mesh of stage `index`; ConfigError when it cannot fit."""
  return make_mesh(config.mesh,
                   num_experts=config.stages[index].model.moe.num_experts)


def build_program(config: RunConfig, index: int, data, init_rng: jax.Array,
                  step_rng: jax.Array) -> StageProgram:
  """The model, optimizer and jitted functions of stage `index`."""
  stage = config.stages[index]
  bounds = boundaries(config.stages)
  mesh = stage_mesh(config, index)
  check_micro_batch(config.train, token_shards(mesh))
  # One device: the plain layer; more: expert-parallel MoE layers.
  model_mesh = mesh if mesh.size > 1 else None
  model = make_model(stage.model, mesh=model_mesh)
  tx = make_optimizer(config.optim, config.train.steps, stage.frozen)
  lengths = config.data.seq_len, config.data.target_len
  init_fn = lambda: init_state(model, tx, init_rng, *lengths)  # noqa: E731
  abstract = jax.eval_shape(init_fn)
  shardings = logical_shardings(
      state_specs(model, tx, *lengths), abstract, mesh,
      axis_rules(config.mesh.shard_params))
  jit_init = jax.jit(init_fn, out_shardings=shardings)
  prepare = init_transform(stage.model)

  def init() -> TrainState:
    state = jit_init()
    if prepare is None:
      return state
    model_state = prepare(state.model_state, data.token_counts)
    return hosts.place(state.replace(model_state=model_state), shardings)

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  steps = tuple(
      (bounds[index] + first, jax.jit(
          make_train_step(make_model(segment, mesh=model_mesh), tx, step_rng,
                          stage_start=bounds[index],
                          grad_accum_steps=config.train.grad_accum_steps,
                          label_smoothing=config.train.label_smoothing),
          in_shardings=(shardings, batch_sharding(mesh)),
          out_shardings=(shardings, replicated), donate_argnums=0))
      for first, segment in segments(stage))
  probe = jax.jit(make_probe_step(model)) if stage.model.has_moe else None
  return StageProgram(index=index, stage=stage, start=bounds[index],
                      end=bounds[index + 1], mesh=mesh, init=init,
                      abstract=abstract, shardings=shardings, train_steps=steps,
                      evaluate=Evaluator(model, data.eval_batches), probe=probe)
