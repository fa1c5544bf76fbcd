"""The encoder trained as a masked LM (`model.arch=encoder`, `data.task=mlm`):
its loss is the mean over the masked positions, accumulated micro-batches
equal the whole batch, a run trains and `moejax-eval` scores it the same, and
the pairs the trainer does not run are one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.errors import ConfigError
from moejax.evaluate import evaluate
from moejax.metrics.writers import read_metrics, series
from moejax.models.config import MoEConfig, TransformerConfig
from moejax.models.losses import token_cross_entropy
from moejax.models.transformer import TransformerLM
from moejax.train import make_train_step, parse, train_and_evaluate
from moejax.train.optimizer import OptimizerConfig, make_optimizer
from moejax.train.program import init_state
from moejax.train.trained import load_trained
from tests.conftest import tiny_config

B, L, V = 16, 8, 32


def _batch():
  keys = jax.random.split(jax.random.key(3), 3)
  targets = jax.random.randint(keys[0], (B, L), 0, V)
  weights = jax.random.bernoulli(keys[1], 0.3, (B, L)).astype(jnp.float32)
  inputs = jnp.where(weights > 0, 4, targets)  # The scored ones masked.
  return {"inputs": inputs, "targets": targets, "weights": weights}


def test_loss_is_the_masked_mean_and_accumulates_like_the_whole_batch():
  # Dense: no per-micro-batch balance loss, so k micro-batches equal B rows.
  model = TransformerLM(TransformerConfig(
      vocab_size=V, max_len=L, num_layers=2, d_model=16, num_heads=2, d_ff=32,
      arch="encoder", moe_layers=(), moe=MoEConfig()))
  tx = make_optimizer(OptimizerConfig(), 10)
  state = init_state(model, tx, jax.random.key(0), L)
  batch = _batch()
  # Rows of unequal masked counts: a mean of micro-batch means would differ.
  counts = np.asarray(batch["weights"]).reshape(2, -1).sum(1)
  assert counts[0] != counts[1]
  logits, _ = model.apply({"params": state.params}, batch["inputs"])
  ce = token_cross_entropy(logits, batch["targets"])
  want = jnp.sum(ce * batch["weights"]) / jnp.sum(batch["weights"])
  runs = {}
  for k in (1, 2):
    step = jax.jit(make_train_step(model, tx, jax.random.key(1),
                                   grad_accum_steps=k))
    runs[k] = step(state, batch)
  np.testing.assert_allclose(runs[1][1]["train/loss"], want, rtol=1e-6)
  np.testing.assert_allclose(runs[2][1]["train/loss"], want, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(runs[2][0].params),
                  jax.tree.leaves(runs[1][0].params), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _mlm_config(**overrides):
  c = tiny_config(train__steps=30, train__eval_every=30,
                  train__checkpoint_every=30, train__log_every=5, **overrides)
  c.model.arch = "encoder"
  c.data.task = "mlm"
  return c


def test_encoder_trains_as_a_masked_lm_and_eval_scores_it_alike(tmp_path):
  summary = train_and_evaluate(parse(_mlm_config()), tmp_path, verbose=False)
  _, losses = series(read_metrics(tmp_path), "train/loss")
  # Starts near a uniform guess over V = 512 (6.2 nats) and learns.
  assert abs(losses[0] - np.log(512)) < 0.5
  assert losses[-1] < losses[0] - 0.5
  result = evaluate(load_trained(tmp_path))
  np.testing.assert_allclose(result["eval/loss"], summary["eval/loss"],
                             rtol=1e-5)
  # Scored: the masked positions only, about 15% of the tokens.
  run = parse(_mlm_config())
  share = result["tokens"] / (result["batches"] * run.train.batch_size
                              * run.data.seq_len)
  assert 0.08 < share < 0.22, share


@pytest.mark.parametrize("arch,task", [("encoder", "lm"), ("decoder", "mlm"),
                                       ("encdec", "lm"), ("decoder", "seq2seq")])
def test_pairs_the_trainer_does_not_run_are_one_line_errors(arch, task):
  c = tiny_config()
  c.model.arch, c.data.task = arch, task
  with pytest.raises(ConfigError, match=(
      rf"^model.arch='{arch}' with data.task='{task}': moejax-train trains "
      r"arch='decoder' on task='lm', arch='encoder' on task='mlm', "
      r"arch='encdec' on task='seq2seq' so far$")):
    parse(c)
