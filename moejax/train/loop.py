"""The training loop: stages of jitted steps, evaluation, probes, checkpoints.

`train_and_evaluate(config, workdir)` is everything `moejax-train` does. A run is
a sequence of stages (one, `train`, unless the config lists several); entering a
stage applies its transform to the previous stage's state. Checkpoints live in a
directory per stage and the run resumes automatically from the newest one, in
the right stage at the right step, with the data position it had. Each stage's
mesh, model and jitted steps are built by `moejax.train.program`. After a step,
the hooks that are due run (log, probe, evaluate, save; `moejax.train.hooks`)
while the step clock is paused.
"""

import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from moejax.errors import (CheckpointError, Interrupted, StorageError,
                           TrainingDiverged)
from moejax.metrics.fluctuation import write_curve
from moejax.metrics.perf import (StepTimer, peak_flops, perf_metrics,
                                 train_flops_per_token)
from moejax.metrics.writers import MetricWriter
from moejax.models.config import TransformerConfig, transformer_config_from_json
from moejax.parallel import hosts
from moejax.parallel.rules import with_shardings
from moejax.paths import as_path
from moejax.stages.machine import check_frozen, enter_stage, transition_key
from moejax.stages.stage import boundaries
from moejax.train.checkpoint import StageCheckpoints, restore_params
from moejax.train.config import RunConfig
from moejax.train.guard import guarded_run
from moejax.train.hooks import Hook, StepEnd
from moejax.train.optimizer import learning_rate_schedule
from moejax.train.preemption import StopSignals
from moejax.train.probing import RouteProbe
from moejax.train.program import StageProgram, build_program, run_keys, stage_mesh
from moejax.train.progress import Progress
from moejax.train.state import TrainState
from moejax.train.workdir import check_workdir, record_config, saved_config


def _flops_per_row_token(model, data) -> float:
  """Training FLOPs per token of a row (`DataConfig.row_tokens`): a seq2seq
  row's source and target tokens share its source + target token FLOPs
  (`train_flops_per_token`), exact when both sides are equally long."""
  if data.task != "seq2seq":
    return train_flops_per_token(model, data.seq_len)
  target_len = data.target_len or data.seq_len
  return (train_flops_per_token(model, target_len, source_len=data.seq_len)
          * target_len / data.row_tokens)


def _check_finite(step: int, metrics: dict[str, Any], last_saved: int | None):
  for key in ("train/loss", "train/grad_norm", "train/param_norm"):
    if key in metrics and not math.isfinite(float(metrics[key])):
      kept = (f"the last good checkpoint (step {last_saved}) is kept"
              if last_saved is not None else "no checkpoint was written")
      raise TrainingDiverged(
          f"{key} is {metrics[key]} at step {step}; lower optim.learning_rate or "
          f"set optim.grad_clip; {kept}")


def _init_source(config: RunConfig) -> tuple[epath.Path, TransformerConfig] | None:
  """The run `train.init_from` points at, checked against this run's data."""
  if not config.train.init_from:
    return None
  source = as_path(config.train.init_from)
  saved = saved_config(source) if source.is_dir() else None
  if saved is None:
    raise CheckpointError(f"train.init_from={source} is not a moejax workdir (no "
                          "config.json); point it at a finished run")
  for key in ("source", "seq_len", "vocab_size", "max_bytes", "eval_fraction"):
    if saved["data"].get(key) != getattr(config.data, key):
      raise CheckpointError(
          f"train.init_from run used data.{key}={saved['data'].get(key)!r}, this "
          f"run {getattr(config.data, key)!r}; the tokenizer must be shared")
  return source, transformer_config_from_json(saved["model"])


class _Run:
  """One `train_and_evaluate` call: the stages' programs, the checkpoints, the
  metric rows, the route probe and the summary the call returns."""

  def __init__(self, config: RunConfig, workdir: epath.Path, data, verbose: bool,
               signals: StopSignals | None = None):
    self.config, self.workdir, self.data = config, workdir, data
    self.signals = signals
    tc = config.train
    self.checkpoints = StageCheckpoints(workdir / "checkpoints",
                                        len(config.stages),
                                        max_to_keep=tc.keep_checkpoints)
    self.writer = MetricWriter(workdir, enabled=hosts.is_writer(),
                               config=config.to_json())
    self.probe = RouteProbe(workdir, data, tc.replay_routes,
                            enabled=hosts.is_writer(),
                            save_inputs=bool(tc.probe_every))
    self.progress_enabled = verbose and hosts.is_writer()
    self.progress: Progress | None = None
    self.schedule = learning_rate_schedule(config.optim, tc.steps)
    self.peak_flops = peak_flops()
    self.init_rng, self.step_rng = run_keys(tc.seed)
    self.last_saved: int | None = None
    self.summary: dict[str, Any] = {}
    self._programs: dict[int, StageProgram] = {}

  def program(self, index: int) -> StageProgram:
    """Stage `index`'s program, built once (a rebuilt one would recompile)."""
    if index not in self._programs:
      self._programs[index] = build_program(self.config, index, self.data,
                                            self.init_rng, self.step_rng)
    return self._programs[index]

  def write(self, program: StageProgram, step: int, row: dict[str, Any]) -> None:
    self.writer.write(step, {"stage": program.index,
                             "stage_name": program.stage.name, **row})

  def save(self, program: StageProgram, state: TrainState, next_batch: int):
    step = int(state.step)
    self.checkpoints.stage(program.index).save(step, state, next_batch=next_batch)
    self.last_saved = step

  def run(self, init_source) -> dict[str, Any]:
    stages = self.config.stages
    state, next_batch, state_stage, prev_model = None, 0, -1, None
    latest = self.checkpoints.restore_newest(lambda i: with_shardings(
        self.program(i).abstract, self.program(i).shardings))
    self.progress = Progress(self.config.train.steps, latest[1] if latest else 0,
                             enabled=self.progress_enabled)
    if latest is not None:
      state_stage, step, state, next_batch = latest
      program = self.program(state_stage)
      self.last_saved = step
      self.writer.truncate_after(step)
      self.probe.fluctuation.resume(step)
      self.progress.message(f"resumed stage {state_stage} "
                            f"({stages[state_stage].name}) at step {step}")
      prev_model = stages[state_stage].model
      first = state_stage if step < program.end else state_stage + 1
    else:
      first = 0
      self.writer.truncate_after(0)  # Rows of a run killed before it saved.
      if init_source is not None:
        source, prev_model = init_source
        params, model_state = restore_params(source / "checkpoints")
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=None, model_state=model_state)
        self.progress.message(f"stage 0 starts from the params in {source}")
    try:
      for index in range(first, len(stages)):
        program = self.program(index)
        if state_stage != index:
          state = self._enter(program, state, prev_model, next_batch)
          state_stage = index
        state, next_batch = self._loop(program, state, next_batch)
        prev_model = program.stage.model
      if "eval/loss" not in self.summary:  # Resumed a finished run.
        self.summary.update(
            self.program(len(stages) - 1).evaluate(state.variables()))
    except BaseException as error:
      failed_save = self._close(quietly=True)
      if isinstance(error, StorageError) and failed_save is not None:
        raise failed_save from None  # The save that filled the disk.
      raise
    self._close()
    probe = self.probe.fluctuation
    curve = write_curve(self.workdir, probe) if probe.enabled else None
    if curve is not None:
      self.summary["router/settled_share_first_probe"] = curve["settled_share"][0]
    self.summary["step"] = boundaries(stages)[-1]
    return self.summary

  def _close(self, quietly: bool = False) -> StorageError | None:
    """Waits for the last checkpoint and closes the writers, every one even if
    one fails. Raises the first failure, or with `quietly` returns the failed
    save (None if the saves are on disk)."""
    errors = {}
    for close in (self.checkpoints.close, self.writer.close, self.progress.close):
      try:
        close()
      except Exception as e:  # pylint: disable=broad-except
        errors[close] = e
    if errors and not quietly:
      raise next(iter(errors.values()))
    failed_save = errors.get(self.checkpoints.close)
    return failed_save if isinstance(failed_save, StorageError) else None

  def _stop_if_asked(self, end: StepEnd) -> None:
    """At the boundary after `end.step`: a failed background save ends the run
    here; so does a stop signal, after saving `end.state` and waiting for it."""
    self.checkpoints.poll()
    signals, step, program = self.signals, end.step, end.program
    if signals is None or not signals.should_stop(step):
      return
    if step == 0:
      raise Interrupted(f"stopped by {signals.describe()} before step 1; nothing "
                        "was trained", exit_code=signals.exit_code)
    if self.last_saved != step:
      if end.metrics is not None:
        _check_finite(step, end.host_metrics, self.last_saved)
      self.save(program, end.state, end.next_batch)
    self.checkpoints.wait()
    where = self.checkpoints.stage(program.index).directory
    raise Interrupted(
        f"stopped by {signals.describe()} after step {step} of "
        f"{self.config.train.steps} (stage {program.index}, "
        f"{program.stage.name}); checkpoint saved in {where}/{step}",
        exit_code=signals.exit_code)

  def _enter(self, program: StageProgram, prev: TrainState | None,
             prev_model: TransformerConfig | None, next_batch: int) -> TrainState:
    """The state `program`'s stage starts from; saved when a transform ran."""
    fresh = program.init()
    if prev is None:
      return fresh
    state = program.place(enter_stage(
        prev, prev_model, program.stage, fresh,
        transition_key(self.config.train.seed, program.index)))
    check_frozen(program.stage, state.params)
    self.save(program, state, next_batch)
    self.progress.message(
        f"stage {program.index} ({program.stage.name}) from step {program.start}"
        + (f", after {program.stage.transform}" if program.stage.transform else ""))
    return state

  def _loop(self, program: StageProgram, state: TrainState, next_batch: int):
    """Trains `program`'s stage from `state` to its last step, running the
    hooks that are due after each step."""
    timer, previous, current = StepTimer(), None, None
    hooks = self._hooks(program, timer)
    end = StepEnd(program, int(state.step), state, None, next_batch)
    for step in range(end.step + 1, program.end + 1):
      self._stop_if_asked(end)
      batch = program.train_batch(self.data, next_batch)
      train_step = program.train_step(step)
      if train_step is not current:  # Compilation is not a training step.
        with timer.paused(previous):
          state, metrics = self._first_step(program, train_step, state, batch)
        current = train_step
      else:
        state, metrics = train_step(state, batch)
        timer.count()
        jax.block_until_ready(previous)  # At most two steps in flight.
        self.progress.advance(step - 1)
      previous = metrics["train/loss"]
      next_batch += 1
      end = StepEnd(program, step, state, metrics, next_batch)
      due = [hook for hook in hooks if hook.due(step, last=step == program.end)]
      if due:
        with timer.paused(metrics):  # The clock times training steps only.
          for hook in due:
            hook.action(end)
    return state, next_batch

  def _hooks(self, program: StageProgram, timer: StepTimer) -> list[Hook]:
    """The periodic work after a step of `program`'s stage, in this order."""
    tc = self.config.train
    return [Hook(tc.log_every, functools.partial(self._log, timer)),
            Hook(tc.probe_every if program.probe else 0, self._probe),
            Hook(tc.eval_every, self._evaluate),
            Hook(tc.checkpoint_every, self._checkpoint)]

  def _log(self, timer: StepTimer, end: StepEnd) -> None:
    """A row of the step's metrics, throughput and learning rate."""
    metrics, data = end.host_metrics, self.config.data
    _check_finite(end.step, metrics, self.last_saved)
    row = {k: float(v) if v.ndim == 0 else v for k, v in metrics.items()}
    row.update(perf_metrics(
        *timer.take(), self.config.train.batch_size * data.row_tokens,
        _flops_per_row_token(end.program.stage.model, data),
        self.peak_flops, end.program.mesh.size))
    row["train/learning_rate"] = float(self.schedule(end.step - 1))
    self.write(end.program, end.step, row)
    self.progress.update(end.step, row)
    self.summary.update({k: v for k, v in row.items() if jnp.ndim(v) == 0})

  def _probe(self, end: StepEnd) -> None:
    self.write(end.program, end.step,
               self.probe(end.program, end.state, end.step))

  def _evaluate(self, end: StepEnd) -> None:
    row = end.program.evaluate(end.state.variables())
    self.write(end.program, end.step, row)
    self.summary.update(row)
    self.progress.message(f"step {end.step:>6} | {end.program.stage.name} | eval "
                          f"loss {row['eval/loss']:.4f} | ppl {row['eval/ppl']:.2f}")

  def _checkpoint(self, end: StepEnd) -> None:
    _check_finite(end.step, end.host_metrics, self.last_saved)
    self.save(end.program, end.state, end.next_batch)

  def _first_step(self, program: StageProgram, train_step, state: TrainState,
                  batch):
    """Compiles and runs the first step of a stage or of one of its segments,
    saying so (it takes a while)."""
    name = f"stage {program.index} ({program.stage.name})"
    if len(program.train_steps) > 1:
      segment = [fn for _, fn in program.train_steps].index(train_step)
      name += (f", segment {segment + 1} of {len(program.train_steps)} "
               f"from step {program.train_steps[segment][0]}")
    self.progress.message(f"compiling the train step of {name} ...")
    start = time.perf_counter()
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    self.progress.message(f"compiled {name} and ran its first step in "
                          f"{time.perf_counter() - start:.1f} s")
    return state, metrics


def train_and_evaluate(config: RunConfig, workdir: str | epath.PathLike,
                       *, verbose: bool = True) -> dict[str, Any]:
  """Trains `config` in `workdir` (a local path or a URI such as gs://...),
  resuming if a checkpoint is there. Every process of a multi-process run calls
  it; only process 0 writes the workdir's files other than checkpoints.

  Returns the last logged train metrics merged with the final evaluation.
  """
  from moejax.data import load_datasets, validate  # pylint: disable=g-import-not-at-top

  workdir = as_path(workdir)
  validate(config.data)
  for index in range(len(config.stages)):
    stage_mesh(config, index)  # Mesh errors before anything is written.
  check_workdir(workdir, config.to_json())
  init_source = _init_source(config)
  with guarded_run(workdir) as signals:
    tokenizer = workdir / "tokenizer.model"
    if init_source and hosts.is_writer() and not tokenizer.exists():
      workdir.mkdir(parents=True, exist_ok=True)
      (init_source[0] / "tokenizer.model").copy(tokenizer)
    data = load_datasets(config.data, workdir=workdir,
                         batch_size=config.train.batch_size)
    if hosts.is_writer():
      record_config(workdir, config.to_json())
    run = _Run(config, workdir, data, verbose, signals)
    if verbose and hosts.is_writer():
      print(data.describe(), flush=True)
    return run.run(init_source)
