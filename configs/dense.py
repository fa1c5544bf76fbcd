"""A dense baseline: the quickstart decoder with every FFN dense.

  moejax-train --config configs/dense.py --workdir /tmp/moejax-dense

Its checkpoint is what `configs/upcycle.py:/tmp/moejax-dense` upcycles.
"""

from moejax.train.config import default_config


def get_config():
  c = default_config()
  c.train.steps = 500
  c.train.batch_size = 16
  c.train.log_every = 20
  c.train.eval_every = 100
  c.train.checkpoint_every = 250
  c.model.moe_layers = "none"
  return c
