"""A training stage: a model, a length, frozen params, and a transform on entry."""

import dataclasses
from typing import Any, Sequence

from moejax.models.config import TransformerConfig


@dataclasses.dataclass(frozen=True)
class Stage:
  """One jitted training loop of a stage machine.

  Attributes:
    name: shown in logs and `metrics.jsonl` (`stage_name`).
    steps: optimizer steps in this stage.
    model: the model trained in this stage.
    frozen: path rules (`moejax.pytree`: regexes over whole param paths such as
      'block_1/moe/router/gate/kernel') of params that the optimizer leaves
      bit-identical in this stage (includes the transform's).
    transform: name of the registered transform applied on entry ('' for none).
    transform_options: its options as sorted (name, value) pairs.
  """

  name: str
  steps: int
  model: TransformerConfig
  frozen: tuple[str, ...] = ()
  transform: str = ""
  transform_options: tuple[tuple[str, Any], ...] = ()


def boundaries(stages: Sequence[Stage]) -> list[int]:
  """[0, end of stage 0, end of stage 1, ..., total steps]."""
  out = [0]
  for stage in stages:
    out.append(out[-1] + stage.steps)
  return out


def stage_of_step(stages: Sequence[Stage], step: int) -> int:
  """Index of the stage that runs step `step` (1-based global step)."""
  bounds = boundaries(stages)
  for i in range(len(stages)):
    if bounds[i] < step <= bounds[i + 1]:
      return i
  raise ValueError(f"step {step} is outside 1..{bounds[-1]}")
