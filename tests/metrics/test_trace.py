"""Routing traces on disk: the documented format, written at every probe, and
replayed by the trainer."""

import numpy as np
import pytest

from moejax.errors import ConfigError
from moejax.metrics.trace import read_trace, trace_steps, write_trace
from moejax.metrics.writers import read_metrics
from moejax.train import parse, train_and_evaluate


def test_write_read_round_trip(tmp_path):
  trace = {"layer_1": {"expert": np.array([[0, 2]], np.int32),
                       "weight": np.array([[0.7, 0.3]], np.float32),
                       "mask": np.array([[True, False]])}}
  path = write_trace(tmp_path, 40, trace)
  assert path.name == "trace_40.npz" and trace_steps(tmp_path) == [40]
  with np.load(path) as f:  # The documented keys, readable without moejax.
    assert sorted(f.files) == ["layer_1/expert", "layer_1/mask", "layer_1/weight"]
  back = read_trace(path)
  for field, value in trace["layer_1"].items():
    np.testing.assert_array_equal(back["layer_1"][field], value)
    assert back["layer_1"][field].dtype == value.dtype
  np.savez(tmp_path / "other.npz", tokens=np.zeros(3))
  with pytest.raises(ConfigError, match="is not a routing trace"):
    read_trace(tmp_path / "other.npz")
  with pytest.raises(ConfigError, match="not found"):
    read_trace(tmp_path / "missing.npz")


def test_probes_write_traces_and_replay_the_first(tmp_path, tiny):
  c = tiny(train__steps=20, train__probe_every=5, train__eval_every=20,
           train__checkpoint_every=20, model__router="topk", model__top_k=2,
           train__replay_routes="first")
  train_and_evaluate(parse(c), tmp_path, verbose=False)
  probes = tmp_path / "probes"
  assert trace_steps(probes) == [5, 10, 15, 20]
  with np.load(probes / "inputs.npz") as f:
    num_tokens = f["tokens"].shape[0]  # 8 sequences x 32 tokens.
  first = read_trace(probes / "trace_5.npz")
  assert sorted(first) == ["layer_1"]
  for field, dtype in (("expert", np.int32), ("weight", np.float32),
                       ("mask", np.bool_)):
    assert first["layer_1"][field].shape == (num_tokens, 2)
    assert first["layer_1"][field].dtype == dtype
  # The top expert the fluctuation metric reads is the trace's heaviest slot.
  with np.load(probes / "step_5.npz") as f:
    top = f["layer_1"]
  heaviest = np.take_along_axis(
      first["layer_1"]["expert"],
      np.argmax(first["layer_1"]["weight"], axis=1)[:, None], axis=1)[:, 0]
  np.testing.assert_array_equal(top, heaviest)
  rows = {r["step"]: r for r in read_metrics(tmp_path) if "probe/loss" in r}
  assert sorted(rows) == [5, 10, 15, 20]
  # The first probe replays itself; later ones differ where routing moved.
  assert rows[5]["probe/replay_loss"] == pytest.approx(rows[5]["probe/loss"],
                                                       rel=1e-6)
  later = read_trace(probes / "trace_20.npz")["layer_1"]["expert"]
  assert not np.array_equal(later, first["layer_1"]["expert"])
  assert rows[20]["probe/replay_loss"] != rows[20]["probe/loss"]


def test_replay_file_must_exist(tiny):
  with pytest.raises(ConfigError, match="train.replay_routes='/nope.npz' is not "
                     "a file"):
    parse(tiny(train__replay_routes="/nope.npz"))
