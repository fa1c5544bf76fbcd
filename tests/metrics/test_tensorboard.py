"""TensorBoard: scalars but not `stage`, per-expert load histograms, hparams and
config text, and no empty event file from an evaluation-only rerun."""

import pathlib
import struct

from tensorboardX.proto import event_pb2

from moejax.metrics.tensorboard import flat_hparams
from moejax.train import parse, train_and_evaluate


def read_events(path: pathlib.Path) -> list[event_pb2.Event]:
  """The records of one event file (TFRecord: length, crc, data, crc)."""
  data, pos, events = path.read_bytes(), 0, []
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
    pos += 12 + length + 4
  return events


def test_tensorboard_of_a_run(tmp_path, tiny):
  config = parse(tiny(train__steps=10, train__checkpoint_every=10,
                      train__eval_every=10, train__probe_every=0))
  train_and_evaluate(config, tmp_path, verbose=False)
  (event_file,) = (tmp_path / "tb").glob("events.out.tfevents.*")
  values = [(v, e.step) for e in read_events(event_file) for v in e.summary.value]
  tags = {v.tag for v, _ in values}
  assert {"train/loss", "eval/ppl", "perf/tokens_per_sec"} <= tags
  assert "stage" not in tags and "stage_name" not in tags
  plugins = {v.metadata.plugin_data.plugin_name for v, _ in values}
  assert {"hparams", "text"} <= plugins
  (text,) = [v for v, _ in values if v.tag.startswith("config")]
  assert b'"num_experts": 4' in text.tensor.string_val[0]
  histograms = {(v.tag, step): v.histo for v, step in values if v.HasField("histo")}
  load = histograms[("router/layer_1/load", 10)]
  assert list(load.bucket_limit) == [0.5, 1.5, 2.5, 3.5]  # One bucket per expert.
  assert abs(sum(load.bucket) - 1.0) < 1e-6  # Shares of the routed slots.

  train_and_evaluate(config, tmp_path, verbose=False)  # Finished: evaluates only.
  assert list((tmp_path / "tb").glob("events.out.tfevents.*")) == [event_file]


def test_flat_hparams():
  config = {"model": {"num_layers": 2, "moe": {"router": "switch",
                                               "router_options": [["jitter", 0.1]]},
                      "moe_layers": [1, 3]},
            "stages": [{"name": "a", "steps": 5, "transform": "", "model": {}}]}
  assert flat_hparams(config) == {
      "model/num_layers": 2, "model/moe/router": "switch",
      "model/moe/router_options": '[["jitter", 0.1]]', "model/moe_layers": "1,3",
      "stages/0/name": "a", "stages/0/steps": 5, "stages/0/transform": ""}
