"""Metric writers: one JSON object per logged step, and TensorBoard event files.

A log never bricks a resume: on open, lines that are not complete JSON rows (a
write cut short by a kill or a full disk) move to `<name>.discarded.jsonl`, as
`{"discarded_line": <text>}` rows; rewrites are atomic (a temporary file renamed
over the log), and a failed append is a one-line StorageError.
"""

import json
import math
import os
import pathlib
import time
from typing import Any, Iterable

import numpy as np
from etils import epath

from moejax.errors import storage_error, warn

METRICS_FILE = "metrics.jsonl"
LOADS_FILE = "router_loads.jsonl"


def _plain(value: Any) -> Any:
  """A JSON-ready Python value (NaN/inf become strings so the line stays valid)."""
  if isinstance(value, (np.ndarray, np.generic)):
    value = value.tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


class MetricWriter:
  """Appends rows to `<workdir>/metrics.jsonl` and scalars to `<workdir>/tb/`.

  Vector metrics (per-expert loads) go to `<workdir>/router_loads.jsonl`, one row
  per logged step. Only the writer with `enabled=True` (process 0) touches files.
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True,
               tensorboard: bool = True):
    self.path = pathlib.Path(workdir) / METRICS_FILE
    self.loads_path = pathlib.Path(workdir) / LOADS_FILE
    self.enabled = enabled
    self._tb = None
    if enabled:
      for path in (self.path, self.loads_path):
        repair_jsonl(path)
    self.tb_dir = pathlib.Path(workdir) / "tb"
    if enabled and tensorboard:
      # Written here, not by tensorboardX's writer thread: a full disk must be
      # an error in the loop, not a dead thread that the next write waits on.
      from tensorboardX.event_file_writer import EventsWriter  # pylint: disable=g-import-not-at-top
      try:
        self.tb_dir.mkdir(parents=True, exist_ok=True)
        self._tb = EventsWriter(os.fspath(self.tb_dir / "events"))
      except OSError as e:
        raise storage_error("TensorBoard events to", self.tb_dir, e) from None

  def truncate_after(self, step: int) -> None:
    """On resume: rows past `step` (written before an interruption) move to
    `<name>.discarded.jsonl` so each log holds one row per step."""
    if not self.enabled:
      return
    for path in (self.path, self.loads_path):
      if not path.exists():
        continue
      keep, drop = [], []
      for line in path.read_text().splitlines():
        if line.strip():
          (keep if json.loads(line).get("step", 0) <= step else drop).append(line)
      if drop:
        _move_aside(path, keep, drop)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Scalars to metrics.jsonl and TensorBoard; arrays to router_loads.jsonl
    (with the row's string fields, e.g. the stage name)."""
    if not self.enabled:
      return
    scalars, vectors = {}, {}
    for key, value in metrics.items():
      (vectors if np.ndim(value) > 0 else scalars)[key] = value
    self._append(self.path, step, scalars)
    if vectors:
      labels = {k: v for k, v in scalars.items() if isinstance(v, (str, int))
                and not isinstance(v, bool) and k.startswith("stage")}
      self._append(self.loads_path, step, {**labels, **vectors})
    if self._tb is not None:
      self._write_tensorboard(step, scalars)

  def _write_tensorboard(self, step: int, scalars: dict[str, Any]) -> None:
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
    from tensorboardX.summary import scalar  # pylint: disable=g-import-not-at-top
    try:
      for key, value in scalars.items():
        if isinstance(value, (int, float, np.generic)) and not isinstance(value, bool):
          self._tb.write_event(event_pb2.Event(
              wall_time=time.time(), step=int(step),
              summary=scalar(key, float(value))))
      self._tb.flush()
    except OSError as e:
      raise storage_error("TensorBoard events to", self.tb_dir, e) from None

  def _append(self, path: pathlib.Path, step: int, values: dict[str, Any]):
    row = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
    try:
      with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    except OSError as e:
      raise storage_error("metrics to", path, e) from None

  def close(self) -> None:
    if self._tb is not None:
      tb, self._tb = self._tb, None
      try:
        tb.close()
      except OSError as e:
        raise storage_error("TensorBoard events to", self.tb_dir, e) from None


def _discarded(path: pathlib.Path) -> pathlib.Path:
  return path.with_suffix(".discarded.jsonl")


def _move_aside(path: pathlib.Path, keep: list[str], drop: list[str]) -> None:
  """Appends `drop` to the discarded log, then rewrites `path` as `keep`."""
  try:
    if drop:
      with epath.Path(_discarded(path)).open("a") as f:
        f.write("".join(line + "\n" for line in drop))
    tmp = epath.Path(path.parent) / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(epath.Path(path))  # Atomic: a kill leaves the old or new log.
  except OSError as e:
    raise storage_error("metrics to", path, e) from None


def repair_jsonl(path: str | os.PathLike) -> int:
  """Moves the lines of `path` that are not JSON objects (a last line cut
  short) to `<name>.discarded.jsonl`; returns how many moved."""
  path = pathlib.Path(path)
  if not path.exists():
    return 0
  keep, drop = [], []
  # Bytes, not text: a cut may split a multi-byte character.
  for line in path.read_bytes().decode("utf-8", "replace").split("\n"):
    if not line.strip():
      continue
    try:
      ok = isinstance(json.loads(line), dict)
    except ValueError:
      ok = False
    (keep if ok else drop).append(line)
  if not drop and (not keep or path.read_bytes().endswith(b"\n")):
    return 0
  _move_aside(path, keep, [json.dumps({"discarded_line": line}) for line in drop])
  if drop:
    warn(f"{path} held {len(drop)} incomplete line(s) (a write cut short); moved "
         f"to {_discarded(path).name}")
  return len(drop)


def read_metrics(workdir: str | os.PathLike,
                 name: str = METRICS_FILE) -> list[dict[str, Any]]:
  """The rows of `<workdir>/metrics.jsonl` (or of `name`), in order."""
  path = pathlib.Path(workdir) / name
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(rows: Iterable[dict[str, Any]], key: str) -> tuple[list[int], list[Any]]:
  """(steps, values) of the rows that carry `key`."""
  pairs = [(r["step"], r[key]) for r in rows if key in r]
  return [p[0] for p in pairs], [p[1] for p in pairs]
