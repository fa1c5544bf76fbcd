"""The router comparison's `expert_choice` run: the shared 4-block model, MoE in blocks 1
and 3, 8 experts, equal active FLOPs (see moejax/train/presets.py).

  moejax-train --config configs/router_expert_choice.py --workdir /tmp/moejax-router-expert_choice

Results of the whole comparison: experiments/README.md.
"""

from moejax.train.presets import method_config


def get_config():
  return method_config("expert_choice")
