"""The encoder-decoder trained on packed seq2seq rows (`model.arch=encdec`,
`data.task=seq2seq`): its loss is the mean over the target tokens, accumulated
micro-batches equal the whole batch, label smoothing is the smoothed mean, and
a run with MoE layers in both stacks trains, reports both stacks' routers,
resumes exactly and `moejax-eval` scores it the same."""

import shutil

import jax
import numpy as np
import pytest

from moejax.data.seq2seq import RowPacker, row_batch
from moejax.evaluate import evaluate
from moejax.metrics.writers import read_metrics, series
from moejax.models import EncoderDecoder
from moejax.models.config import MoEConfig, TransformerConfig
from moejax.models.losses import seq2seq_loss, weighted_cross_entropy
from moejax.train import make_train_step, parse, train_and_evaluate
from moejax.train.inputs import apply_model, model_inputs
from moejax.train.optimizer import OptimizerConfig, make_optimizer
from moejax.train.program import init_state
from moejax.train.trained import load_trained
from tests.conftest import tiny_config
from tests.data.corpora import side_lines, source_of, write_pair
from tests.train.conftest import assert_same_curve

B, S, T, V = 8, 12, 10, 32


def _batch():
  """B packed rows of random pairs of 1-5 tokens: rows of unequal target
  counts, several examples per row."""
  rng = np.random.default_rng(0)
  packer, rows = RowPacker(S, T), []
  while len(rows) < B:
    n, m = rng.integers(1, 6, size=2)
    rows += packer.add(list(rng.integers(5, V, n)), list(rng.integers(5, V, m)))
  tokens, segments = map(np.stack, zip(*rows[:B]))
  return model_inputs(row_batch(tokens, segments, S))


def _model():
  # Dense: no per-micro-batch balance loss, so k micro-batches equal B rows.
  return EncoderDecoder(TransformerConfig(
      vocab_size=V, max_len=max(S, T), num_layers=2, d_model=16, num_heads=2,
      d_ff=32, arch="encdec", moe_layers=(), moe=MoEConfig()))


def test_loss_is_the_target_mean_accumulates_and_smooths():
  model = _model()
  tx = make_optimizer(OptimizerConfig(), 10)
  state = init_state(model, tx, jax.random.key(0), S, T)
  batch = _batch()
  counts = np.asarray(batch["weights"]).reshape(B // 2, 2, T).sum((0, 2))
  assert counts[0] != counts[1]  # Micro-batch means would differ from it.
  logits, _ = apply_model(model, {"params": state.params}, batch)
  want, _ = seq2seq_loss(logits, batch["targets"],
                         batch["decoder_segment_ids"])
  runs = {}
  for k in (1, 2):
    step = jax.jit(make_train_step(model, tx, jax.random.key(1),
                                   grad_accum_steps=k))
    runs[k] = step(state, batch)
    np.testing.assert_allclose(runs[k][1]["train/loss"], want, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(runs[2][0].params),
                  jax.tree.leaves(runs[1][0].params), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  smoothed, _ = weighted_cross_entropy(logits, batch["targets"],
                                       batch["weights"], label_smoothing=0.1)
  step = jax.jit(make_train_step(model, tx, jax.random.key(1),
                                 label_smoothing=0.1))
  np.testing.assert_allclose(step(state, batch)[1]["train/loss"], smoothed,
                             rtol=1e-6)
  assert abs(smoothed - want) > 1e-4


def _seq2seq_config(paths, **overrides):
  c = tiny_config(train__steps=20, train__eval_every=10,
                  train__checkpoint_every=10, train__log_every=2,
                  train__probe_every=10, **overrides)
  c.model.arch = "encdec"
  c.model.encoder_moe_layers = "1"  # And the decoder's block 1 (every_other).
  c.data.task = "seq2seq"
  c.data.source = source_of(paths)
  c.data.seq_len, c.data.target_len = 48, 40
  c.data.vocab_size, c.data.overlong = 400, "truncate"
  c.data.eval_fraction = 0.125
  return c


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
  return write_pair(tmp_path_factory.mktemp("pairs"), *side_lines())


def test_encdec_trains_resumes_and_eval_scores_it_alike(pairs, tmp_path):
  config = parse(_seq2seq_config(pairs))
  straight = tmp_path / "straight"
  summary = train_and_evaluate(config, straight, verbose=False)
  rows = read_metrics(straight)
  _, losses = series(rows, "train/loss")
  assert losses[-1] < losses[0] - 0.5
  loads = read_metrics(straight, "router_loads.jsonl")
  logged = {k for row in rows for k in row}
  for layer in ("encoder_layer_1", "decoder_layer_1"):  # Both stacks report.
    assert {f"router/{layer}/aux_loss", f"router/{layer}/fluctuation"} <= logged
    _, load = series(loads, f"router/{layer}/load")
    assert np.asarray(load).shape == (len(losses), 4)
    np.testing.assert_allclose(np.sum(load, axis=1), 1, rtol=1e-5)
  assert len(list((straight / "probes").glob("step_*.npz"))) == 2
  result = evaluate(load_trained(straight))
  np.testing.assert_allclose(result["eval/loss"], summary["eval/loss"],
                             rtol=1e-5)
  assert 0 < result["eval/accuracy"] < 1
  # Resumed from step 10 (the step-20 checkpoint gone): the same curve.
  resumed = tmp_path / "resumed"
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / "checkpoints" / "stage_0" / "20")
  train_and_evaluate(config, resumed, verbose=False)
  assert_same_curve(resumed, rows)
