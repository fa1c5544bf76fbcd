"""TensorBoard event files of a run: scalars, per-expert load, hparams and config.

Shapes: E experts.

The event file is opened on the first write, so a run that writes nothing (an
evaluation-only rerun of a finished run) leaves no empty file. On opening, the
run's config goes in as hparams (flattened scalar keys, shown by the HParams
dashboard against `eval/loss` and `eval/ppl`) and as JSON text.

Per-expert load is a histogram per MoE layer whose buckets are the experts:
bucket e (from e - 0.5 to e + 0.5) holds expert e's share of the routed slots,
so the Histograms/Distributions dashboards show the load of every expert over
training.
"""

import json
import os
import time
from typing import Any

import numpy as np
from etils import epath

from moejax.errors import storage_error

# Metric rows' labels, not quantities to chart.
_NOT_SCALARS = ("stage", "step")
HPARAM_METRICS = ("eval/loss", "eval/ppl")


def flat_hparams(config: dict[str, Any]) -> dict[str, Any]:
  """`section/key` -> value for every scalar of a resolved config (stages by
  name: `stages/<i>/name`, lengths and transform)."""
  out = {}

  def walk(prefix: str, value: Any) -> None:
    if isinstance(value, dict):
      for k, v in value.items():
        walk(f"{prefix}/{k}" if prefix else k, v)
    elif isinstance(value, (list, tuple)):
      if all(isinstance(v, (str, int, float)) for v in value):
        out[prefix] = ",".join(map(str, value))
      elif prefix == "stages":
        for i, stage in enumerate(value):
          for key in ("name", "steps", "transform"):
            out[f"stages/{i}/{key}"] = stage.get(key)
      else:
        out[prefix] = json.dumps(value)
    elif isinstance(value, (str, int, float, bool)):
      out[prefix] = value

  walk("", config)
  return out


class TensorBoard:
  """A lazily opened event file under `logdir`, written in the caller's thread.

  Events go straight to the file (tensorboardX's `EventsWriter`), not through
  `SummaryWriter`'s background thread: a full disk is a one-line error at the
  write that failed, never a dead thread that the next write waits on.
  """

  def __init__(self, logdir: str | os.PathLike,
               config: dict[str, Any] | None = None):
    self.logdir = os.fspath(logdir)
    self._config = config
    self._writer = None

  def _open(self):
    if self._writer is None:
      from tensorboardX.event_file_writer import EventsWriter  # pylint: disable=g-import-not-at-top
      from tensorboardX.summary import hparams, text  # pylint: disable=g-import-not-at-top
      epath.Path(self.logdir).mkdir(parents=True, exist_ok=True)
      self._writer = EventsWriter(os.path.join(self.logdir, "events"))
      if self._config is not None:
        params = {k: v for k, v in flat_hparams(self._config).items()
                  if v is not None}
        for summary in hparams(params, {k: None for k in HPARAM_METRICS}):
          self._add(summary, 0)
        config = json.dumps(self._config, indent=2)
        # Indented by 4: markdown shows it as a code block.
        self._add(text("config", "    " + config.replace("\n", "\n    ")), 0)
    return self._writer

  def _add(self, summary, step: int) -> None:
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
    self._writer.write_event(event_pb2.Event(
        wall_time=time.time(), step=int(step), summary=summary))

  def write(self, step: int, scalars: dict[str, Any],
            vectors: dict[str, Any]) -> None:
    """Numeric scalars (not `stage`) as charts; `.../load` vectors as
    per-expert histograms. Flushed before returning; an OSError becomes a
    `StorageError`."""
    charts = {k: float(v) for k, v in scalars.items()
              if k not in _NOT_SCALARS and not isinstance(v, (bool, str))
              and isinstance(v, (int, float, np.generic))}
    loads = {k: np.asarray(v, np.float64) for k, v in vectors.items()
             if k.endswith("/load")}
    if not charts and not loads:
      return
    from tensorboardX.summary import histogram_raw, scalar  # pylint: disable=g-import-not-at-top
    try:
      self._open()
      for key, value in charts.items():
        self._add(scalar(key, value), step)
      for key, load_E in loads.items():
        experts = np.arange(load_E.shape[0], dtype=np.float64)
        self._add(histogram_raw(
            key, min=-0.5, max=experts[-1] + 0.5, num=float(load_E.sum()),
            sum=float(np.dot(experts, load_E)),
            sum_squares=float(np.dot(experts**2, load_E)),
            bucket_limits=(experts + 0.5).tolist(),
            bucket_counts=load_E.tolist()), step)
      self._writer.flush()
    except OSError as e:
      raise storage_error("TensorBoard events to", self.logdir, e) from None

  def close(self) -> None:
    if self._writer is not None:
      try:
        self._writer.close()
      except OSError:
        pass  # The failed write was reported; closing must not raise again.
      self._writer = None
