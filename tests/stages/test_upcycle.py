"""Sparse upcycling from another run's checkpoint (`train.init_from`)."""

import numpy as np
import pytest

from moejax import layout
from moejax.errors import CheckpointError
from moejax.train import parse, train_and_evaluate
from moejax.train.checkpoint import restore_params
from moejax.train.config import stage_config
from tests.conftest import checkpoint_params


def test_upcycle_starts_from_the_dense_run(tmp_path, tiny):
  dense = tiny(train__steps=10, train__checkpoint_every=10, train__eval_every=10)
  dense.model.moe_layers = "none"
  train_and_evaluate(parse(dense), tmp_path / "dense", verbose=False)

  up = tiny(train__steps=10, train__checkpoint_every=10, train__eval_every=10,
            train__init_from=str(tmp_path / "dense"))
  up.stages = [stage_config("upcycled", transform="upcycle")]
  summary = train_and_evaluate(parse(up), tmp_path / "up", verbose=False)
  assert np.isfinite(summary["eval/loss"])
  # The tokenizer is the dense run's (copied), so both see the same ids.
  assert ((tmp_path / "up" / "tokenizer.model").read_bytes()
          == (tmp_path / "dense" / "tokenizer.model").read_bytes())
  # Stage 0 was saved on entry: every expert is the dense FFN of its block.
  dense_params, _ = restore_params(tmp_path / "dense" / "checkpoints")
  entry = sorted((tmp_path / "up" / "checkpoints" / "stage_0").glob("[0-9]*"))
  assert [p.name for p in entry] == ["0", "10"]
  start = checkpoint_params(tmp_path / "up", 0, 0)
  experts = start["block_1"]["moe"]["experts"]["w_in"]
  ffn = dense_params["block_1"]["ffn"]["w_in"]["kernel"]
  for e in range(experts.shape[0]):
    np.testing.assert_array_equal(experts[e], ffn)
  np.testing.assert_array_equal(start["block_0"]["ffn"]["w_in"]["kernel"],
                                dense_params["block_0"]["ffn"]["w_in"]["kernel"])


def test_init_from_must_be_a_run_with_the_same_data(tmp_path, tiny):
  up = tiny(train__init_from=str(tmp_path / "nothing"))
  up.stages = [stage_config("upcycled", transform="upcycle")]
  with pytest.raises(CheckpointError, match="is not a moejax workdir"):
    train_and_evaluate(parse(up), tmp_path / "up", verbose=False)


@pytest.mark.parametrize("dense_scanned", [True, False])
def test_upcycle_across_block_layouts(tmp_path, tiny, dense_scanned):
  """A dense run in one layout (`model.scan_layers`) upcycles into an MoE run
  in the other: the entry params, unrolled, hold the dense run's weights, each
  expert its block's FFN, and the run trains."""
  dense = tiny(train__steps=2, train__checkpoint_every=2, train__eval_every=2,
               model__scan_layers=dense_scanned)
  dense.model.moe_layers = "none"
  train_and_evaluate(parse(dense), tmp_path / "dense", verbose=False)
  up = tiny(train__steps=2, train__checkpoint_every=2, train__eval_every=2,
            train__init_from=str(tmp_path / "dense"),
            model__scan_layers=not dense_scanned)
  up.stages = [stage_config("upcycled", transform="upcycle")]
  up = parse(up)
  summary = train_and_evaluate(up, tmp_path / "up", verbose=False)
  assert np.isfinite(summary["eval/loss"])
  saved, _ = restore_params(tmp_path / "dense" / "checkpoints")
  dense_params = layout.unrolled(saved, parse(dense).stages[0].model)
  assert ("stack_0" in saved) == dense_scanned
  start = checkpoint_params(tmp_path / "up", 0, 0)
  assert ("stack_0" in start) == (not dense_scanned)
  start = layout.unrolled(start, up.stages[0].model)
  ffn = dense_params["block_1"]["ffn"]["w_in"]["kernel"]
  experts = start["block_1"]["moe"]["experts"]["w_in"]
  for e in range(experts.shape[0]):
    np.testing.assert_array_equal(experts[e], ffn)
  for path in (("block_0", "ffn", "w_in", "kernel"),
               ("block_1", "attn", "qkv", "kernel"), ("embedding",)):
    got, want = start, dense_params
    for key in path:
      got, want = got[key], want[key]
    np.testing.assert_array_equal(got, want, err_msg="/".join(path))
