"""Quickstart: a 4-block MoE LM (Switch top-1, 8 experts every other block) on the
embedded corpus (Python's standard library source and docs), on a 2-core CPU.

  moejax-train --config configs/quickstart.py --workdir /tmp/moejax-quickstart

Measured (2-core CPU, see README): eval perplexity falls from the first eval
(step 100) to the end (step 600) by the factor recorded in the README.
"""

from moejax.train.config import default_config


def get_config():
  c = default_config()
  c.train.steps = 500
  c.train.batch_size = 16
  c.train.log_every = 20
  c.train.eval_every = 100
  c.train.checkpoint_every = 200
  c.data.source = "embedded"
  c.data.seq_len = 128
  c.data.vocab_size = 1024
  c.model.router = "switch"
  c.model.num_experts = 8
  c.model.top_k = 1
  return c
