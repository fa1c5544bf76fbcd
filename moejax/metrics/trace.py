"""Routing traces of the probe tokens, on disk, and the reference a run replays.

Shapes: T tokens (the probe tokens: B * L of the probe batch, row-major), K
top-k slots per token, B batch, L length.

Format: at every probe the trainer writes `<workdir>/probes/trace_<step>.npz`
(numpy, compressed) with, for every MoE layer `layer_<i>`, three arrays:

  layer_<i>/expert  int32[T, K]    expert of each routing slot
  layer_<i>/weight  float32[T, K]  its combine weight
  layer_<i>/mask    bool[T, K]     whether the slot is used

i.e. the `Routing` each layer used for the probe tokens (saved beside them in
`probes/inputs.npz`; `probes/step_<step>.npz` keeps each token's top expert,
which the fluctuation metrics read). K is the router's slot count (E for
routers with a variable number of experts per token), in the router's slot
order (DSelect-k: by descending weight; `Routing.expert_weights` gives the
per-expert weights of any order). `read_trace` gives
`{layer: {"expert", "weight", "mask"}}`, which
`moejax.routing.replay.replay_variables` turns into the variables that force
these routes in a later forward pass over the same tokens.
"""

import os

import numpy as np
from etils import epath

from moejax.errors import ConfigError
from moejax.paths import as_path
from moejax.routing.replay import TRACE_FIELDS

TRACE_PREFIX = "trace_"


def trace_path(probe_dir: str | os.PathLike, step: int) -> epath.Path:
  return as_path(probe_dir) / f"{TRACE_PREFIX}{step}.npz"


def write_trace(probe_dir: str | os.PathLike, step: int,
                trace: dict[str, dict[str, np.ndarray]]) -> epath.Path:
  """Writes `trace` ({layer: {field: array}}) as `trace_<step>.npz`, atomically
  (a kill never leaves half a trace)."""
  path = trace_path(probe_dir, step)
  tmp = path.parent / f".{path.name}.tmp"
  path.parent.mkdir(parents=True, exist_ok=True)
  with tmp.open("wb") as f:
    np.savez_compressed(f, **{f"{layer}/{f}": np.asarray(fields[f])
                              for layer, fields in trace.items()
                              for f in TRACE_FIELDS})
  tmp.replace(path)
  return path


def read_trace(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
  """{layer: {"expert", "weight", "mask"}} of a trace file; ConfigError if it
  is missing or not a trace."""
  path = as_path(path)
  if not path.is_file():
    raise ConfigError(f"routing trace {path} not found; point train.replay_routes"
                      " at a probes/trace_<step>.npz of a run")
  trace: dict[str, dict[str, np.ndarray]] = {}
  with path.open("rb") as fh, np.load(fh) as f:
    for key in f.files:
      layer, _, field = key.partition("/")
      if field not in TRACE_FIELDS:
        raise ConfigError(f"{path} is not a routing trace (entry {key!r})")
      trace.setdefault(layer, {})[field] = f[key]
  return trace


def trace_steps(probe_dir: str | os.PathLike) -> list[int]:
  """Steps of the trace files in `probe_dir`, ascending."""
  probe_dir = as_path(probe_dir)
  if not probe_dir.exists():
    return []
  return sorted(int(p.stem[len(TRACE_PREFIX):])
                for p in probe_dir.glob(f"{TRACE_PREFIX}*.npz"))


class ReplayReference:
  """The routes a run replays at each probe (`train.replay_routes`).

  `spec` is "" (off), `first` (this run's first probe trace: the one in memory,
  or on a resume the first one in the workdir, so a resumed run replays the
  same one) or the path of a trace file. Every process of a multi-process run
  holds the same reference at the same step, so all of them replay together.
  """

  def __init__(self, spec: str, probe_dir: str | os.PathLike):
    self.spec = spec
    self._trace = None
    if spec == "first":
      steps = trace_steps(probe_dir)
      if steps:
        self._trace = read_trace(trace_path(probe_dir, steps[0]))
    elif spec:
      self._trace = read_trace(spec)

  def observe(self, trace: dict[str, dict[str, np.ndarray]]) -> None:
    """Takes the trace of a probe as the reference if `first` has none yet."""
    if self.spec == "first" and self._trace is None:
      self._trace = trace

  def trace(self) -> dict[str, dict[str, np.ndarray]] | None:
    """The reference trace, or None (off, or no probe yet)."""
    return self._trace
