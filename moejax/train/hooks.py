"""The loop's periodic work: hooks, each an action run after every `every`-th
training step of a stage and after the stage's last step (logging, probes,
evaluation, checkpoints)."""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from moejax.parallel import hosts
from moejax.train.program import StageProgram
from moejax.train.state import TrainState


@dataclasses.dataclass
class StepEnd:
  """What the hooks see after training step `step` of `program`'s stage: the
  state, the step's metrics (device arrays; None before a stage's first step)
  and the batch the next step reads."""
  program: StageProgram
  step: int
  state: TrainState
  metrics: dict[str, Any] | None
  next_batch: int

  @functools.cached_property
  def host_metrics(self) -> dict[str, Any]:
    """The metrics as numpy values, fetched once for all the hooks (on every
    process: the fetch may be a collective)."""
    return hosts.fetch(self.metrics)


@dataclasses.dataclass(frozen=True)
class Hook:
  """`action(end)` after every `every`-th step and after a stage's last step;
  never when `every` is 0."""
  every: int
  action: Callable[[StepEnd], None]

  def due(self, step: int, *, last: bool) -> bool:
    return self.every > 0 and (step % self.every == 0 or last)
