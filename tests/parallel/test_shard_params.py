"""`mesh.shard_params`: params and Adam moments split over the devices (FSDP),
the same training run as the replicated layout, checkpoints across the layouts.

Tolerance: losses and params agree to rtol 1e-5 (float32; only where sums are
split differs); a restored leaf is bit-identical to the one saved.
"""

import dataclasses
import pathlib
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moejax import layout
from moejax.errors import ConfigError
from moejax.metrics.writers import read_metrics, series
from moejax.models.transformer import TransformerLM
from moejax.parallel import (LOGICAL_AXIS_RULES, SHARDED_AXIS_RULES, MeshConfig,
                             axis_rules, logical_shardings, logical_spec,
                             make_mesh, with_shardings)
from moejax.pytree import path_str
from moejax.train import parse, train_and_evaluate
from moejax.train.checkpoint import Checkpointer
from moejax.train.optimizer import make_optimizer
from moejax.train.program import build_program, run_keys
from moejax.train.trained import load_trained
from moejax.train.state import state_specs
from tests.conftest import checkpoint_params, tiny_config

MESHES = [(1, 8), (2, 4)]
STEPS = 4
QKV, W_IN = "block_0/attn/qkv/kernel", "block_1/moe/experts/w_in"
MOMENTS = ("params/", "opt_state/2/0/mu/", "opt_state/2/0/nu/")
# Embedding, position, 2 x (qkv, out), dense w_in, w_out, router gate,
# experts' w_in, w_out: 11 weights with a model dim, each with its mu and nu.
NUM_SPLIT = 3 * 11


def _config(data, expert, shard_params, train=(), **model):
  """The tiny MoE LM (D = 32, F = 64, 8 experts in block 1) on a mesh;
  `train`: (key, value) pairs of the train section besides this file's."""
  c = tiny_config(train__steps=STEPS, train__log_every=1,
                  train__eval_every=STEPS, train__checkpoint_every=STEPS,
                  train__probe_every=0, model__num_experts=8,
                  **{f"train__{k}": v for k, v in train},
                  **{f"model__{k}": v for k, v in model.items()})
  c.mesh.data, c.mesh.expert, c.mesh.shard_params = data, expert, shard_params
  return parse(c)


def _program(config):
  """The stage-0 program (`build_program` reads only these fields of data)."""
  data = types.SimpleNamespace(token_counts=None, eval_batches=[])
  return build_program(config, 0, data, *run_keys(config.train.seed))


def _flat(tree) -> dict:
  return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: x is None or isinstance(x, P))}


def _assert_split(arrays: dict, split: set) -> None:
  """1/8 of each leaf of `split` per device; norm scales, counts and the step
  whole."""
  for key, x in arrays.items():
    want = x.size // 8 if key in split else x.size
    assert x.addressable_shards[0].data.size == want, key


@dataclasses.dataclass(frozen=True)
class Run:
  """A finished run: its workdir, train losses, final eval loss, last params."""
  workdir: pathlib.Path
  losses: list
  eval_loss: float
  params: dict


def _train(config, workdir) -> Run:
  summary = train_and_evaluate(config, workdir, verbose=False)
  _, losses = series(read_metrics(workdir), "train/loss")
  assert len(losses) == STEPS
  return Run(workdir, losses, summary["eval/loss"],
             checkpoint_params(workdir, 0, STEPS))


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
  """The replicated run of each mesh, trained once for every test here."""
  runs = {}

  def run(data, expert) -> Run:
    if (data, expert) not in runs:
      workdir = tmp_path_factory.mktemp(f"replicated_{data}x{expert}")
      runs[data, expert] = _train(_config(data, expert, False), workdir)
    return runs[data, expert]
  return run


def _assert_same_run(got: Run, want: Run, params=None, atol=1e-7) -> None:
  """Equal losses, evaluation and params (`params`: got's, unrolled)."""
  np.testing.assert_allclose(got.losses, want.losses, rtol=1e-5)
  np.testing.assert_allclose(got.eval_loss, want.eval_loss, rtol=1e-5)
  params = got.params if params is None else params
  assert jax.tree.structure(params) == jax.tree.structure(want.params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want.params),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("data,expert", MESHES)
def test_every_weight_with_a_model_dim_stays_split_over_all_devices(data,
                                                                    expert):
  config = _config(data, expert, True)
  program = _program(config)
  state = program.init()
  arrays = _flat(state)
  stage = config.stages[0]
  logical = _flat(state_specs(TransformerLM(stage.model), make_optimizer(
      config.optim, STEPS, stage.frozen), config.data.seq_len))
  for tree in MOMENTS:
    # D = 32 over all 8 devices (both axes split the batch): 4 rows each.
    assert arrays[tree + QKV].sharding.spec == P(("data", "expert"), None,
                                                 None, None)
    assert arrays[tree + QKV].addressable_shards[0].data.shape == (4, 3, 2, 16)
    # [E, D, F] = [8, 32, 64]: experts over `expert`, D over `data`.
    assert arrays[tree + W_IN].sharding.spec == P("expert", "data", None)
    assert arrays[tree + W_IN].addressable_shards[0].data.shape == (
        8 // expert, 32 // data, 64)
  split = {k for k, names in logical.items() if names and "embed" in names}
  assert len(split) == NUM_SPLIT
  _assert_split(arrays, split)
  # A train step leaves the updated params and moments split the same way.
  tokens = np.random.default_rng(0).integers(
      0, config.stages[0].model.vocab_size, (8, config.data.seq_len + 1))
  batch = program.batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  shardings = _flat(program.shardings)
  stepped = _flat(program.train_step(1)(state, batch)[0])
  assert stepped.keys() == shardings.keys()
  for key, x in stepped.items():
    assert x.sharding == shardings[key], key
  _assert_split(stepped, split)
  assert int(stepped["step"]) == 1


@pytest.mark.parametrize("data,expert", MESHES)
def test_sharded_params_train_like_replicated_ones(tmp_path, replicated, data,
                                                   expert):
  want = replicated(data, expert)
  got = _train(_config(data, expert, True), tmp_path / "sharded")
  _assert_same_run(got, want)
  # Each finished workdir resumed in the other layout: restores its last
  # checkpoint, only evaluates, to the same loss.
  for run, shard in ((want, True), (got, False)):
    again = train_and_evaluate(_config(data, expert, shard), run.workdir,
                               verbose=False)
    np.testing.assert_allclose(again["eval/loss"], run.eval_loss, rtol=1e-5)
    # And loaded for use (`load_trained`) in that layout, bit-equal.
    trained = load_trained(run.workdir, config=_config(data, expert, shard))
    qkv = _flat(trained.variables["params"])[QKV]
    assert qkv.sharding.spec == (P(("data", "expert"), None, None, None)
                                 if shard else P())
    np.testing.assert_array_equal(qkv, _flat(run.params)[QKV])


def test_scanned_sharded_params_train_like_unrolled_replicated_ones(
    tmp_path, replicated):
  config = _config(2, 4, True, scan_layers=True)
  arrays = _flat(_program(config).init())
  # A scanned leaf's leading `layers` axis stays whole; D splits as unrolled.
  assert arrays["params/stack_0/block_0/attn/qkv/kernel"].sharding.spec == P(
      None, ("data", "expert"), None, None, None)
  assert arrays["params/stack_1/block_0/moe/experts/w_in"].sharding.spec == P(
      None, "expert", "data", None)
  got = _train(config, tmp_path / "scanned")
  assert "stack_0" in got.params
  # Scanned blocks sum in another order (gradients agree to 1e-5,
  # tests/models/test_scan.py), and Adam turns the rounding of a gradient
  # element near zero into an update of up to lr = 3e-3: params agree to
  # atol 5e-6 (1.2e-6 measured).
  _assert_same_run(got, replicated(2, 4), atol=5e-6,
                   params=layout.unrolled(got.params, config.stages[0].model))


def test_sharded_params_accumulate_like_replicated_ones(tmp_path):
  """Gradient accumulation (2 micro-batches of 8 on the 2x4 mesh) on sharded
  params and moments: the replicated layout's accumulated run, and the global
  balance loss (counts over the whole accumulated batch) alike."""
  train = (("grad_accum_steps", 2), ("batch_size", 16))
  for options in ({}, {"balance": "global"}):
    runs = [_train(_config(2, 4, shard, train=train, router_options=options),
                   tmp_path / f"{shard}_{bool(options)}")
            for shard in (False, True)]
    _assert_same_run(runs[1], runs[0])


def test_checkpoints_restore_across_the_two_layouts(tmp_path):
  """Saved replicated, restored sharded, and the other way, on the 2x4 mesh."""
  programs = {shard: _program(_config(2, 4, shard)) for shard in (False, True)}
  for saved, restored in ((False, True), (True, False)):
    state = programs[saved].init()
    # Non-zero Adam moments, so the round trip checks them too.
    state = state.replace(opt_state=jax.tree.map(
        lambda a: a + jnp.asarray(1, a.dtype), state.opt_state))
    checkpointer = Checkpointer(tmp_path / f"saved_{saved}")
    checkpointer.save(1, state, next_batch=2)
    checkpointer.wait()
    target = programs[restored]
    back, next_batch = checkpointer.restore(
        with_shardings(target.abstract, target.shardings))
    checkpointer.close()
    assert next_batch == 2
    got, want = _flat(back), _flat(state)
    for tree in MOMENTS:
      spec = got[tree + QKV].sharding.spec
      assert spec == (P(("data", "expert"), None, None, None) if restored
                      else P())
    for key, x in got.items():
      assert x.sharding == _flat(target.shardings)[key], key
      np.testing.assert_array_equal(x, want[key], err_msg=key)


def test_rule_sets_differ_only_in_where_embed_goes():
  assert ({n for n, _ in LOGICAL_AXIS_RULES}
          == {n for n, _ in SHARDED_AXIS_RULES})
  assert axis_rules(False) is LOGICAL_AXIS_RULES
  assert axis_rules(True) is SHARDED_AXIS_RULES
  assert ([r for r in LOGICAL_AXIS_RULES if r[0] != "embed"]
          == [r for r in SHARDED_AXIS_RULES if r[0] != "embed"])
  assert dict(LOGICAL_AXIS_RULES)["layers"] is None
  sharded = lambda *names: logical_spec(names, SHARDED_AXIS_RULES)  # noqa: E731
  # Scanned leaves keep their `layers` axis whole, deep experts their sublayer
  # axis; norm scales stay whole; the replicated rules split only experts.
  assert sharded("layers", "embed", "mlp") == P(None, ("data", "expert"), None)
  assert sharded("layers", "expert", "mlp", "embed") == P(None, "expert", None,
                                                          "data")
  assert sharded("expert", "expert_depth", "embed", "mlp") == P(
      "expert", None, "data", None)
  assert sharded("layers", "norm") == P(None, None)
  assert logical_spec(("expert", "embed", "mlp")) == P("expert", None, None)
  assert logical_spec(("vocab", "embed")) == P(None, None)


def test_model_dim_that_does_not_split_is_one_config_error():
  mesh = make_mesh(MeshConfig(1, 8), num_experts=8)
  tree = {"ffn": {"w_in": jax.ShapeDtypeStruct((12, 64), jnp.float32)}}
  specs = {"ffn": {"w_in": P("embed", "mlp")}}
  logical_shardings(specs, tree, mesh)  # Replicated: nothing to split.
  with pytest.raises(ConfigError, match=(
      r"^ffn/w_in has size 12 in dim 0, not divisible by mesh axes \('data', "
      r"'expert'\) of size 8; .* or set mesh.shard_params=False$")):
    logical_shardings(specs, tree, mesh, axis_rules(True))


def test_model_width_the_devices_cannot_split_is_one_line_at_build():
  config = _config(1, 8, True, d_model=36)  # 36 rows over 8 devices.
  with pytest.raises(ConfigError) as e:
    _program(config)
  message = str(e.value)
  assert "\n" not in message
  assert re.fullmatch(r"\S+ has size 36 in dim \d, not divisible by mesh axes "
                      r"\('data', 'expert'\) of size 8; choose mesh sizes that "
                      r"divide it or set mesh.shard_params=False", message)


def test_shard_params_must_be_a_bool():
  with pytest.raises(ConfigError, match="mesh.shard_params='yes' must be True "
                     "or False"):
    MeshConfig(shard_params="yes").validate()
