"""Training stages joined by explicit `params -> params` transforms.

  Stage                 one jitted loop: model, length, frozen params, entry transform
  diversify, upcycle    one dense FFN -> E (masked) experts
  TRANSFORMS            registered transforms (diversify, upcycle,
                        freeze_distilled_router)
  enter_stage           fresh init of the next model, overlaid with the transformed
                        previous state (params and optimizer moments)
"""

from moejax.stages.machine import carry_opt_state, enter_stage, transition_key
from moejax.stages.stage import Stage, boundaries, stage_of_step
from moejax.stages.transforms import (TRANSFORMS, Transition, TransitionContext,
                                      diversify, get_transition, upcycle)

__all__ = [
    "Stage", "TRANSFORMS", "Transition", "TransitionContext", "boundaries",
    "carry_opt_state", "diversify", "enter_stage", "get_transition",
    "stage_of_step", "transition_key", "upcycle",
]
