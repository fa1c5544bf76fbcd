"""The runs of a comparison: seeds share data order and init across methods,
and every method spends the dense model's active FFN FLOPs."""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import runs
from moejax.models import TransformerLM
from moejax.train.program import run_keys
from moejax.train.presets import METHODS


def args(**overrides) -> argparse.Namespace:
  parser = argparse.ArgumentParser()
  runs.add_arguments(parser)
  ns = parser.parse_args(["--budget-tokens", str(40 * 16 * 128), "--workdir", "w"])
  runs.check_arguments(parser, ns)
  for key, value in overrides.items():
    setattr(ns, key, value)
  return ns


def test_every_method_spends_the_dense_active_ffn_flops():
  flops = {m: runs.build_config(m, args()).to_json()["derived"][
      "active_ffn_flops_per_token"] for m in METHODS}
  dense = flops["dense"]["train"]
  for method, by_stage in flops.items():
    assert list(by_stage.values())[-1] == dense, (method, by_stage)


def test_a_seed_fixes_data_order_and_shared_init_across_methods():
  configs = {m: runs.build_config(m, args(), seed=3) for m in ("dense", "switch")}
  assert {(c.train.seed, c.data.seed) for c in configs.values()} == {(3, 3)}
  assert configs["dense"].data == configs["switch"].data  # The same batches.
  tokens_BL = jnp.zeros((1, 8), jnp.int32)
  params = {m: nn.unbox(TransformerLM(c.model).init(run_keys(3)[0], tokens_BL))[
      "params"] for m, c in configs.items()}
  # Every param the two models share by path and shape starts equal (the dense
  # FFNs of blocks 0 and 2, attention, norms, embeddings), and there are many.
  flat = {m: dict(jax.tree_util.tree_flatten_with_path(p)[0])
          for m, p in params.items()}
  shared = [k for k, v in flat["dense"].items()
            if k in flat["switch"] and v.shape == flat["switch"][k].shape]
  assert len(shared) >= 20
  for key in shared:
    np.testing.assert_array_equal(flat["dense"][key], flat["switch"][key])
  other = nn.unbox(TransformerLM(configs["dense"].model).init(run_keys(4)[0],
                                                              tokens_BL))["params"]
  assert not np.array_equal(other["block_0"]["ffn"]["w_in"]["kernel"],
                            params["dense"]["block_0"]["ffn"]["w_in"]["kernel"])


def test_run_dirs_name_the_point_and_seed(tmp_path):
  config = runs.build_config("switch", args(), seed=2,
                             point=runs.Point("normal", 1e-2))
  assert (config.model.ffn_init, config.optim.learning_rate) == ("normal", 1e-2)
  assert runs.run_dir(tmp_path, "switch", config) == (
      tmp_path / "switch" / "normal-lr0.01" / "seed_2")


def test_a_run_of_other_length_in_the_workdir_is_refused(tmp_path):
  short = runs.build_config("dense", args())
  workdir = runs.run_dir(tmp_path, "dense", short)
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text('{"train": {"steps": 7}}')
  with pytest.raises(SystemExit, match="holds a run of 7 steps, this one has 40"):
    runs.train_run(tmp_path, workdir, short, verbose=False)
