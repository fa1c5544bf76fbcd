"""The training loop: data -> jitted steps -> metrics, evaluation, checkpoints.

`train_and_evaluate(config, workdir)` is everything `moejax-train` does; it
resumes automatically from the latest checkpoint in `workdir`.
"""

import math
import pathlib
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax.errors import TrainingDiverged
from moejax.metrics.writers import MetricWriter
from moejax.models.transformer import TransformerLM
from moejax.train.checkpoint import Checkpointer
from moejax.train.config import RunConfig
from moejax.train.optimizer import learning_rate_schedule, make_optimizer
from moejax.train.state import TrainState
from moejax.train.step import make_eval_step, make_train_step
from moejax.train.progress import Progress
from moejax.train.workdir import check_workdir, record_config


def init_state(model: nn.Module, tx: optax.GradientTransformation,
               rng: jax.Array, seq_len: int) -> TrainState:
  """Fresh variables (logical-axis boxes removed) and optimizer state at step 0."""
  tokens_BL = jnp.zeros((1, seq_len), jnp.int32)
  variables = dict(nn.unbox(model.init(rng, tokens_BL)))
  params = variables.pop("params")
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), model_state=variables)


class Evaluator:
  """Mean next-token loss and perplexity over a fixed set of held-out batches."""

  def __init__(self, model: nn.Module, batches):
    self._step = jax.jit(make_eval_step(model))
    self._batches = batches

  def __call__(self, variables) -> dict[str, float]:
    totals = None
    for batch in self._batches:
      out = self._step(variables, {"inputs": batch["inputs"],
                                "targets": batch["targets"]})
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    loss = float(totals["loss_sum"] / totals["tokens"])
    return {"eval/loss": loss,
            "eval/ppl": math.exp(loss) if loss < 700 else float("inf")}


def _check_finite(step: int, metrics: dict[str, Any], last_saved: int | None):
  for key in ("train/loss", "train/grad_norm", "train/param_norm"):
    if key in metrics and not math.isfinite(float(metrics[key])):
      kept = (f"the last good checkpoint (step {last_saved}) is kept"
              if last_saved is not None else "no checkpoint was written")
      raise TrainingDiverged(
          f"{key} is {metrics[key]} at step {step}; lower optim.learning_rate or "
          f"set optim.grad_clip; {kept}")


def _model_inputs(batch):
  return {"inputs": batch["inputs"], "targets": batch["targets"]}


def train_and_evaluate(config: RunConfig, workdir: str | pathlib.Path,
                       *, verbose: bool = True) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming if a checkpoint is there).

  Returns the last logged train metrics merged with the final evaluation.
  """
  from moejax.data import load_datasets, validate  # pylint: disable=g-import-not-at-top

  workdir = pathlib.Path(workdir)
  validate(config.data)
  check_workdir(workdir, config.to_json())
  is_main = jax.process_index() == 0
  progress_enabled = verbose and is_main
  data = load_datasets(config.data, workdir=workdir,
                       batch_size=config.train.batch_size)
  record_config(workdir, config.to_json())
  if progress_enabled:
    print(data.describe(), flush=True)

  tc = config.train
  model = TransformerLM(config.model)
  tx = make_optimizer(config.optim, tc.steps)
  schedule = learning_rate_schedule(config.optim, tc.steps)
  init_rng, step_rng = jax.random.split(jax.random.key(tc.seed))
  init = jax.jit(lambda: init_state(model, tx, init_rng, config.data.seq_len))
  checkpointer = Checkpointer(workdir / "checkpoints",
                              max_to_keep=tc.keep_checkpoints)
  writer = MetricWriter(workdir, enabled=is_main)
  last_saved = checkpointer.latest_step()
  if last_saved is not None:
    state, next_batch = checkpointer.restore(jax.eval_shape(init))
    writer.truncate_after(int(state.step))
  else:
    state, next_batch = init(), 0
  start = int(state.step)
  progress = Progress(tc.steps, start, enabled=progress_enabled)
  if start:
    progress.message(f"resumed from step {start} in {workdir / 'checkpoints'}")

  train_step = jax.jit(make_train_step(model, tx, step_rng), donate_argnums=0)
  evaluate = Evaluator(model, data.eval_batches)
  tokens_per_step = tc.batch_size * config.data.seq_len
  summary: dict[str, float] = {}
  timer_start, timer_steps = None, 0
  try:
    for step in range(start + 1, tc.steps + 1):
      state, metrics = train_step(state, _model_inputs(data.train[next_batch]))
      next_batch += 1
      timer_steps += 1
      if timer_start is None:  # Exclude compilation from tokens/s.
        jax.block_until_ready(metrics)
        timer_start, timer_steps = time.perf_counter(), 0
      if step % tc.log_every == 0 or step == tc.steps:
        metrics = jax.device_get(metrics)
        _check_finite(step, metrics, last_saved)
        elapsed = time.perf_counter() - timer_start
        row = {k: float(v) for k, v in metrics.items()}
        row["perf/tokens_per_sec"] = (
            timer_steps * tokens_per_step / elapsed if timer_steps else 0.0)
        row["train/learning_rate"] = float(schedule(step - 1))
        writer.write(step, row)
        progress.update(step, row)
        summary.update(row)
        timer_start, timer_steps = time.perf_counter(), 0
      if step % tc.eval_every == 0 or step == tc.steps:
        row = evaluate(state.variables())
        writer.write(step, row)
        summary.update(row)
        progress.message(f"step {step:>6} | eval loss {row['eval/loss']:.4f} | "
                         f"eval ppl {row['eval/ppl']:.2f}")
      if step % tc.checkpoint_every == 0 or step == tc.steps:
        _check_finite(step, jax.device_get(metrics), last_saved)
        checkpointer.save(step, state, next_batch=next_batch)
        last_saved = step
  finally:
    checkpointer.close()
    writer.close()
    progress.close()
  if start >= tc.steps:
    summary.update(evaluate(state.variables()))
  summary["step"] = max(start, tc.steps)
  return summary
