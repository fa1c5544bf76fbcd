"""Quickstart: a 4-block MoE LM (Switch top-1, 8 experts in blocks 1 and 3) on the
embedded corpus (Python's standard library source and docs), on a 2-core CPU.

  moejax-train --config configs/quickstart.py --workdir /tmp/moejax-quickstart

Measured on a 2-core CPU: under 4 minutes end to end; held-out perplexity 115.5 at
the first evaluation (step 100) and 36.4 at step 500 (README, Quickstart).
"""

from moejax.train.presets import method_config


def get_config():
  return method_config("switch", steps=500)
