"""Sparse upcycling: a dense model's FFNs become 8 Switch-routed experts.

  # A dense first stage, then upcycled, in one run:
  moejax-train --config configs/upcycle.py --workdir /tmp/moejax-upcycle
  # From a finished dense run (configs/dense.py) elsewhere:
  moejax-train --config configs/upcycle.py:/tmp/moejax-dense --workdir /tmp/moejax-up2

Without an argument: stage 0 `dense` (half the steps) then stage 1 `upcycled`
(transform `upcycle`: every expert an exact copy of the FFN, Adam moments
replicated). With a dense workdir as argument: one stage that starts from that
run's last checkpoint (`train.init_from`; the tokenizer is copied from it).
Measured in the router comparison (experiments/README.md); see docs/stages.md.
"""

from moejax.train.presets import method_config


def get_config(dense_workdir: str = ""):
  c = method_config("upcycle", steps=500)
  if dense_workdir:
    c.train.init_from = dense_workdir
    c.stages = [c.stages[1]]  # Only the upcycled stage.
  return c
