"""Sparse upcycling: a dense model's FFNs become 8 Switch-routed experts.

  # From a dense run in this workdir's own first stage:
  moejax-train --config configs/upcycle.py --workdir /tmp/moejax-upcycle
  # From a finished dense run (configs/dense.py) elsewhere:
  moejax-train --config configs/upcycle.py:/tmp/moejax-dense --workdir /tmp/moejax-up2

Without an argument: stage 0 `dense` (half the steps) then stage 1 `upcycled`
(transform `upcycle`: every expert an exact copy of the FFN, Adam moments
replicated). With a dense workdir as argument: one stage that starts from that
run's last checkpoint (`train.init_from`; the tokenizer is copied from it).
Measured on a 2-core CPU: see the README section "Stages".
"""

from moejax.train.config import default_config, stage_config


def get_config(dense_workdir: str = ""):
  c = default_config()
  c.train.steps = 500
  c.train.batch_size = 16
  c.train.log_every = 20
  c.train.eval_every = 100
  c.train.checkpoint_every = 250
  c.train.probe_every = 20
  c.model.moe_layers = "every_other"
  c.model.num_experts = 8
  c.model.router = "switch"
  upcycled = stage_config("upcycled", transform="upcycle",
                          transform_options={"mask_ratio": 0.0})
  if dense_workdir:
    c.train.init_from = dense_workdir
    c.stages = [upcycled]
  else:
    c.stages = [stage_config("dense", fraction=0.5, model={"moe_layers": "none"}),
                upcycled]
  return c
