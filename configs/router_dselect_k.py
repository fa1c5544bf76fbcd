"""The router comparison's `dselect_k` run: the shared 4-block model, MoE in blocks 1
and 3, 8 experts, equal active FLOPs (see moejax/train/presets.py).

  moejax-train --config configs/router_dselect_k.py --workdir /tmp/moejax-router-dselect_k

Results of the whole comparison: experiments/README.md.
"""

from moejax.train.presets import method_config


def get_config():
  return method_config("dselect_k")
