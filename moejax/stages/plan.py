"""What a stage compiles and what its fresh state gets, as the stage machine says.

Shapes: V vocabulary.

A stage trains one model in segments, one compiled train step each. Most stages
are one segment; a router whose sparsity changes at a step its options name
(`Router.phases`: the DTS gate, sampled top-1 from `hard_step`) splits its stage
there, each segment's model routing exactly as the stage's own from that step
on, with static shapes that follow the segment's sparsity. A fresh state gets
its router's init transform, if it has one (`Router.init_transform`: Hash's
table balanced on the training corpus's token counts). The trainer compiles
and initialises what these say (`moejax.train.program`) and knows no router.
"""

import dataclasses
from typing import Any, Callable

import numpy as np

from moejax import layout
from moejax.models.config import TransformerConfig
from moejax.routing.registry import router_class, router_options
from moejax.stages.stage import Stage

# (first stage step, what holds from it on), ascending from step 0.
Segments = tuple[tuple[int, Any], ...]


def _options(model: TransformerConfig) -> dict[str, Any]:
  """The stage's router options, defaults included."""
  return {**router_options(model.moe.router), **dict(model.moe.router_options)}


def segments(stage: Stage) -> Segments:
  """((first stage step, model), ...) of `stage`: the model of each segment,
  `stage.model` itself for the first; one segment without MoE layers (in any
  stack)."""
  model = stage.model
  if not model.has_moe:
    return ((0, model),)
  moe = model.moe
  phases = router_class(moe.router).phases(_options(model), stage.steps)
  given = dict(moe.router_options)
  return tuple(
      (first, model if not overrides else dataclasses.replace(
          model, moe=dataclasses.replace(moe, router_options=tuple(
              sorted({**given, **overrides}.items())))))
      for first, overrides in phases)


def segment_at(plan: Segments, stage_step: int) -> Any:
  """What `plan` holds at `stage_step` (the update from state step
  `stage_step` to the next)."""
  return [x for first, x in plan if stage_step >= first][-1]


def init_transform(model: TransformerConfig
                   ) -> Callable[[dict, np.ndarray], dict] | None:
  """`(model_state, token_counts_V) -> model_state` that a fresh state of
  `model` gets before training, given the training corpus's int[V] token
  counts; None when its router has none (most) or it has no MoE layers.
  The transform sees the unrolled layout whatever `model.scan_layers` says."""
  if not model.has_moe:
    return None
  transform = router_class(model.moe.router).init_transform(
      _options(model), num_experts=model.moe.num_experts)
  return None if transform is None else layout.canonical(transform, model)
