"""Routing fluctuation: how often probe tokens change expert during training.

Shapes: T tokens (the probe tokens), Y steps (the probes so far), B batch, L
length (of the probe batch).

Every `probe_every` steps the trainer routes a fixed set of held-out tokens
deterministically and records each token's (top) expert in every MoE layer.
Live: `router/fluctuation` is the share of probe tokens whose expert changed since
the previous probe (mean over layers). At the end, the curve of the StableMoE
paper: for each token, the last probe step at which its expert differed from its
final expert; the cumulative share of tokens settled by each step.
"""

import json
import os

import numpy as np
from etils import epath

from moejax.errors import storage_error
from moejax.metrics.trace import write_trace
from moejax.paths import as_path

PROBE_DIR = "probes"


class FluctuationProbe:
  """Saves each probe's routes under `<workdir>/probes/` and compares them."""

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self.dir = as_path(workdir) / PROBE_DIR
    self.enabled = enabled
    self._previous: dict[str, np.ndarray] | None = None

  def save_inputs(self, tokens_BL: np.ndarray, domains_BL: np.ndarray,
                  domain_names: tuple[str, ...]) -> None:
    """Keeps the probe tokens beside the routes (`probes/inputs.npz`), so a
    notebook can colour the text by expert or count experts per domain."""
    if not self.enabled:
      return
    self.dir.mkdir(parents=True, exist_ok=True)
    with (self.dir / "inputs.npz").open("wb") as f:
      np.savez(f, tokens=np.asarray(tokens_BL).reshape(-1),
               domains=np.asarray(domains_BL).reshape(-1),
               domain_names=np.asarray(domain_names))

  def resume(self, step: int) -> None:
    """Starts comparing against the last probe at or before `step`."""
    steps = [s for s in self.steps() if s <= step]
    self._previous = self.load(steps[-1]) if steps else None

  def steps(self) -> list[int]:
    if not self.dir.exists():
      return []
    return sorted(int(p.stem.split("_")[1]) for p in self.dir.glob("step_*.npz"))

  def load(self, step: int) -> dict[str, np.ndarray]:
    with (self.dir / f"step_{step}.npz").open("rb") as fh, np.load(fh) as f:
      return {k: f[k] for k in f.files}

  def record(self, step: int, routes: dict[str, np.ndarray],
             trace: dict[str, dict[str, np.ndarray]] | None = None
             ) -> dict[str, float]:
    """Stores `routes` (layer -> int[T]) and the full routing `trace` (see
    `moejax.metrics.trace`); returns the fluctuation metrics."""
    routes = {k: np.asarray(v) for k, v in routes.items()}
    if self.enabled:
      path = self.dir / f"step_{step}.npz"
      tmp = path.parent / f".{path.name}.tmp"
      try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as f:
          np.savez(f, **routes)
        tmp.replace(path)  # Atomic: a kill never leaves half a probe.
        if trace:
          write_trace(self.dir, step, trace)
      except OSError as e:
        raise storage_error("routing probes to", path, e) from None
    metrics = {}
    prev = self._previous
    shared = [k for k in routes if prev is not None and k in prev
              and prev[k].shape == routes[k].shape]
    for layer in shared:
      metrics[f"router/{layer}/fluctuation"] = float(
          np.mean(routes[layer] != prev[layer]))
    if shared:
      metrics["router/fluctuation"] = float(np.mean(
          [metrics[f"router/{k}/fluctuation"] for k in shared]))
    self._previous = routes
    return metrics


def settling_curve(steps: list[int], routes: list[np.ndarray]
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Per token the last probe step whose expert differs from the final one
  (the first probe step if it never changed), and for each probe step the share
  of tokens settled by then. routes: Y arrays int[T]."""
  stacked_YT = np.stack(routes)
  differs_YT = stacked_YT != stacked_YT[-1]
  steps_arr = np.asarray(steps)
  # Index of the last probe that differs; -1 when none does.
  last_diff_T = np.where(differs_YT.any(0),
                         len(steps) - 1 - np.argmax(differs_YT[::-1], axis=0), -1)
  # A token is settled from the probe after its last difference.
  settled_at_T = steps_arr[np.minimum(last_diff_T + 1, len(steps) - 1)]
  settled_at_T = np.where(last_diff_T < 0, steps_arr[0], settled_at_T)
  share_Y = np.array([np.mean(settled_at_T <= s) for s in steps_arr])
  return settled_at_T, share_Y


def write_curve(workdir: str | os.PathLike, probe: FluctuationProbe) -> dict | None:
  """Writes `fluctuation.json` and `fluctuation.png` from every saved probe."""
  steps = probe.steps()
  if len(steps) < 2:
    return None
  loaded = [probe.load(s) for s in steps]
  layers = sorted(set.intersection(*(set(r) for r in loaded)))
  # Only probes with the final layout (a stage can change which layers route).
  final_shapes = {k: loaded[-1][k].shape for k in layers}
  keep = [i for i, r in enumerate(loaded)
          if all(r[k].shape == final_shapes[k] for k in layers)]
  steps = [steps[i] for i in keep]
  result = {"steps": steps, "layers": {}}
  for layer in layers:
    settled, share = settling_curve(steps, [loaded[i][layer] for i in keep])
    result["layers"][layer] = {
        "settled_share": share.tolist(),
        "changed_after_first_probe": float(np.mean(settled > steps[0])),
    }
  shares = np.mean([result["layers"][k]["settled_share"] for k in layers], axis=0)
  result["settled_share"] = shares.tolist()
  path = as_path(workdir)
  (path / "fluctuation.json").write_text(json.dumps(result, indent=1) + "\n")
  _plot(path / "fluctuation.png", result)
  return result


def _plot(path: epath.Path, result: dict) -> None:
  # A bare Figure: no pyplot state, so a notebook's backend is left alone.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(5, 3.5))
  ax = fig.subplots()
  for layer, curve in result["layers"].items():
    ax.plot(result["steps"], np.asarray(curve["settled_share"]) * 100, label=layer)
  ax.set_xlabel("training step")
  ax.set_ylabel("probe tokens with their final expert (%)")
  ax.set_title("Routing fluctuation: when tokens settle")
  ax.set_ylim(0, 102)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=120)
