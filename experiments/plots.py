"""The comparison's figures, one PNG per function.

Shapes: M methods, E experts, G domains.

Figures are `matplotlib.figure.Figure` objects rendered by Agg on save, without
pyplot, so importing this module never changes the backend of a notebook.
"""

import pathlib
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from experiments.summary import RunSummary


MARKERS = "os^Dv<>ph*"


def _save(fig: Figure, path: pathlib.Path) -> pathlib.Path:
  fig.savefig(path, dpi=110)
  return path


def ppl_vs_tokens(runs: Sequence[RunSummary], target_ppl: float | None,
                  path: pathlib.Path) -> pathlib.Path:
  """Held-out perplexity against training tokens, every method on one axis."""
  fig = Figure(figsize=(7, 4.5), layout="constrained")
  ax = fig.subplots()
  for i, run in enumerate(runs):  # Markers and dashes: some curves coincide.
    tokens = np.asarray(run.eval_steps) * run.tokens_per_step / 1e6
    ax.plot(tokens, run.eval_ppl, marker=MARKERS[i % len(MARKERS)], ms=4,
            ls="-" if i % 2 == 0 else "--", label=run.method)
  if target_ppl is not None:
    ax.axhline(target_ppl, color="grey", ls="--", lw=1,
               label=f"target {target_ppl:.2f}")
  ax.set_yscale("log")
  ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
  ax.yaxis.set_major_formatter(ScalarFormatter())
  ax.yaxis.set_minor_formatter(NullFormatter())
  ax.set_xlabel("training tokens (millions)")
  ax.set_ylabel("valid perplexity")
  ax.set_title("Valid perplexity at equal tokens (the same batches for every method)",
               fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8, ncol=2)
  return _save(fig, path)


def fluctuation_vs_step(runs: Sequence[RunSummary],
                        path: pathlib.Path) -> pathlib.Path:
  """Left: share of probe tokens that changed expert since the previous probe.
  Right: share of probe tokens already on their final expert (StableMoE's curve)."""
  fig = Figure(figsize=(11, 4), layout="constrained")
  left, right = fig.subplots(1, 2)
  for run in runs:
    if not run.probe_steps:
      continue
    left.plot(run.probe_steps, np.asarray(run.fluctuation) * 100, label=run.method)
    right.plot(run.settle_steps, np.asarray(run.settled_share) * 100,
               label=run.method)
  left.set_ylabel("tokens that changed expert since last probe (%)")
  right.set_ylabel("tokens already on their final expert (%)")
  right.set_ylim(0, 102)
  for ax in (left, right):
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
  left.set_title("Routing fluctuation (mean over MoE layers)")
  right.set_title("When probe tokens settle")
  return _save(fig, path)


def _heatmap(ax, values: np.ndarray, rows: Sequence[str], cols: Sequence[str],
             title: str, vmax: float | None = None):
  image = ax.imshow(values, cmap="viridis", aspect="auto", vmin=0, vmax=vmax)
  ax.set_xticks(range(len(cols)), cols, fontsize=7)
  ax.set_yticks(range(len(rows)), rows, fontsize=8)
  ax.set_title(title, fontsize=9)
  for (i, j), v in np.ndenumerate(values):
    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
            color="white" if v < 0.6 * (vmax or values.max() or 1) else "black")
  return image


def load_heatmap(runs: Sequence[RunSummary], path: pathlib.Path) -> pathlib.Path | None:
  """Per MoE layer, methods x experts: share of routed slots per expert (mean over
  the last 10% of steps; 1/E everywhere is perfect balance)."""
  runs = [r for r in runs if r.loads_E]
  if not runs:
    return None
  layers = sorted({layer for r in runs for layer in r.loads_E})
  fig = Figure(figsize=(5.5 * len(layers), 0.5 * len(runs) + 1.6),
               layout="constrained")
  axes = fig.subplots(1, len(layers), squeeze=False)
  for ax, layer in zip(axes[0], layers):
    with_layer = [r for r in runs if layer in r.loads_E]
    num_e = max(len(r.loads_E[layer]) for r in with_layer)
    values_ME = np.zeros((len(with_layer), num_e))
    for i, r in enumerate(with_layer):
      values_ME[i, :len(r.loads_E[layer])] = r.loads_E[layer]
    image = _heatmap(ax, values_ME, [r.method for r in with_layer],
                     [str(e) for e in range(num_e)],
                     f"{layer}: load share per expert (balanced = {1 / num_e:.3f})")
    ax.set_xlabel("expert")
    fig.colorbar(image, ax=ax, shrink=0.8)
  return _save(fig, path)


def domain_heatmaps(runs: Sequence[RunSummary], path: pathlib.Path
                    ) -> pathlib.Path | None:
  """For each method (rows) and MoE layer (columns), domains x experts: the share
  of a domain's held-out tokens whose top expert is e (last checkpoint)."""
  runs = [r for r in runs if r.domain_GE and len(r.domain_names) > 1]
  if not runs:
    return None
  layers = sorted({layer for r in runs for layer in r.domain_GE})
  fig = Figure(figsize=(4.8 * len(layers),
                      1.5 + 0.45 * len(runs[0].domain_names) * len(runs)),
               layout="constrained")
  axes = fig.subplots(len(runs), len(layers), squeeze=False)
  for row, run in zip(axes, runs):
    for ax, layer in zip(row, layers):
      if layer not in run.domain_GE:
        ax.axis("off")
        continue
      values_GE = run.domain_GE[layer]
      _heatmap(ax, values_GE, run.domain_names,
               [str(e) for e in range(values_GE.shape[1])],
               f"{run.method} / {layer}", vmax=1.0)
  fig.suptitle("Expert by domain: share of each domain's held-out tokens per expert",
               fontsize=10)
  return _save(fig, path)
