"""Metric writers: one JSON object per logged step, and TensorBoard event files.

A log never bricks a resume: on open, lines that are not complete JSON rows (a
write cut short by a kill or a full disk) move to `<name>.discarded.jsonl`, as
`{"discarded_line": <text>}` rows; rewrites are atomic (a temporary file renamed
over the log), and a failed append is a one-line StorageError.
"""

import json
import math
import os
from typing import Any, Iterable

import numpy as np
from etils import epath

from moejax.errors import storage_error, warn
from moejax.metrics.tensorboard import TensorBoard
from moejax.paths import append_text, as_path

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
  """Appends rows to `<workdir>/metrics.jsonl` and to TensorBoard in `<workdir>/tb/`
  (`moejax.metrics.tensorboard`).

  Vector metrics (per-expert loads) go to `<workdir>/router_loads.jsonl`, one row
  per logged step. Only the writer with `enabled=True` (process 0) touches files.
  `workdir` is local or a URI epath supports (gs://...).
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True,
               tensorboard: bool = True, config: dict[str, Any] | None = None):
    self.path = as_path(workdir) / METRICS_FILE
    self.loads_path = as_path(workdir) / LOADS_FILE
    self.enabled = enabled
    self._tb = None
    if enabled:
      for path in (self.path, self.loads_path):
        repair_jsonl(path)
    if enabled and tensorboard:  # `config`: hparams and text in TensorBoard.
      self._tb = TensorBoard(as_path(workdir) / "tb", config)

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
      self._tb.write(step, scalars, vectors)

  def _append(self, path: epath.Path, step: int, values: dict[str, Any]):
    row = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
    try:
      append_text(path, json.dumps(row) + "\n")
    except OSError as e:
      raise storage_error("metrics to", path, e) from None

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _discarded(path: epath.Path) -> epath.Path:
  return path.with_suffix(".discarded.jsonl")


def _move_aside(path: epath.Path, keep: list[str], drop: list[str]) -> None:
  """Appends `drop` to the discarded log, then rewrites `path` as `keep`."""
  try:
    if drop:
      append_text(_discarded(path), "".join(line + "\n" for line in drop))
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)  # Atomic: a kill leaves the old or new log.
  except OSError as e:
    raise storage_error("metrics to", path, e) from None


def repair_jsonl(path: str | os.PathLike) -> int:
  """Moves the lines of `path` that are not JSON objects (a last line cut
  short) to `<name>.discarded.jsonl`; returns how many moved."""
  path = as_path(path)
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
  path = as_path(workdir) / name
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(rows: Iterable[dict[str, Any]], key: str) -> tuple[list[int], list[Any]]:
  """(steps, values) of the rows that carry `key`."""
  pairs = [(r["step"], r[key]) for r in rows if key in r]
  return [p[0] for p in pairs], [p[1] for p in pairs]
