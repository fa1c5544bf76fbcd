"""A tiny run config shared by the training tests."""

import pytest

from moejax.train.config import default_config


def tiny_config(**overrides):
  """A 2-block MoE LM on 150 KB of the embedded corpus: seconds per run."""
  c = default_config()
  c.model.num_layers = 2
  c.model.d_model = 32
  c.model.num_heads = 2
  c.model.d_ff = 64
  c.model.num_experts = 4
  c.model.moe_layers = "every_other"
  c.data.source = "embedded"
  c.data.max_bytes = 150_000
  c.data.vocab_size = 512
  c.data.seq_len = 32
  c.data.eval_batches = 2
  c.train.batch_size = 8
  c.train.steps = 40
  c.train.log_every = 5
  c.train.eval_every = 20
  c.train.checkpoint_every = 20
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 5
  for dotted, value in overrides.items():
    section, key = dotted.split("__")
    c[section][key] = value
  return c


@pytest.fixture
def tiny():
  return tiny_config
