"""The comparison's figures, one PNG per function.

Shapes: M methods, E experts, G domains.

Every method has one colour and marker in every figure (`style`), fixed by its
place in `moejax.train.presets.METHODS`; curves are the mean over seeds with a
band from the lowest to the highest seed. Figures are
`matplotlib.figure.Figure` objects rendered by Agg on save, without pyplot, so
importing this module never changes the backend of a notebook.
"""

import pathlib
import zlib

import matplotlib
import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from moejax.train.presets import METHODS

MARKERS = "os^Dv<>ph*PX"
_PALETTE = matplotlib.colormaps["tab20"].colors


def style(method: str) -> dict:
  """The colour and marker of `method` in every figure."""
  i = (METHODS.index(method) if method in METHODS
       else zlib.crc32(method.encode()) % len(_PALETTE))
  # Even tab20 entries first (the strong shades), then the light ones.
  colour = _PALETTE[(2 * i) % len(_PALETTE) + (2 * i) // len(_PALETTE) % 2]
  return {"color": colour, "marker": MARKERS[i % len(MARKERS)]}


def _save(fig: Figure, path: pathlib.Path) -> pathlib.Path:
  fig.savefig(path, dpi=110)
  return path


def _curves(runs, xs_of, ys_of):
  """(x, mean y, min y, max y) over the seeds, on the x values all runs share."""
  common = sorted(set.intersection(*(set(xs_of(r)) for r in runs)))
  if not common:
    return None
  ys = np.asarray([[dict(zip(xs_of(r), ys_of(r)))[x] for x in common] for r in runs],
                  np.float64)
  return np.asarray(common), ys.mean(0), ys.min(0), ys.max(0)


def ppl_vs_tokens(results, target_ppl: float | None,
                  path: pathlib.Path) -> pathlib.Path:
  """Held-out perplexity against training tokens, every method on one axis."""
  fig = Figure(figsize=(7.5, 4.8), layout="constrained")
  ax = fig.subplots()
  for m in results:
    curve = _curves(m.runs, lambda r: r.eval_steps, lambda r: r.eval_ppl)
    if curve is None:
      continue
    steps, mean, lo, hi = curve
    tokens = steps * m.runs[0].tokens_per_step / 1e6
    s = style(m.method)
    ax.plot(tokens, mean, marker=s["marker"], ms=4, color=s["color"], lw=1.4,
            label=f"{m.method} ({len(m.runs)} seed{'s' * (len(m.runs) > 1)})")
    if len(m.runs) > 1:
      ax.fill_between(tokens, lo, hi, color=s["color"], alpha=0.15, lw=0)
  if target_ppl is not None:  # Black, dotted, unlabelled in the legend.
    ax.axhline(target_ppl, color="black", ls=":", lw=1.2)
    ax.annotate(f"target {target_ppl:.2f}", (1.0, target_ppl),
                xycoords=("axes fraction", "data"), xytext=(-4, 3),
                textcoords="offset points", ha="right", fontsize=8)
  ax.set_yscale("log")
  ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
  ax.yaxis.set_major_formatter(ScalarFormatter())
  ax.yaxis.set_minor_formatter(NullFormatter())
  ax.set_xlabel("training tokens (millions)")
  ax.set_ylabel("valid perplexity")
  ax.set_title("Valid perplexity at equal tokens (mean over seeds; band: min-max)",
               fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8, ncol=2)
  return _save(fig, path)


def fluctuation_vs_step(results, path: pathlib.Path) -> pathlib.Path:
  """Left: share of probe tokens that changed expert since the previous probe.
  Right: share of probe tokens already on their final expert (StableMoE's curve)."""
  fig = Figure(figsize=(11, 4), layout="constrained")
  left, right = fig.subplots(1, 2)
  for m in results:
    s = style(m.method)
    for ax, xs, ys in ((left, lambda r: r.probe_steps, lambda r: r.fluctuation),
                       (right, lambda r: r.settle_steps,
                        lambda r: r.settled_share)):
      if not all(xs(r) for r in m.runs):
        continue
      curve = _curves(m.runs, xs, ys)
      if curve is None:
        continue
      steps, mean, lo, hi = curve
      ax.plot(steps, 100 * mean, color=s["color"], label=m.method)
      if len(m.runs) > 1:
        ax.fill_between(steps, 100 * lo, 100 * hi, color=s["color"], alpha=0.15,
                        lw=0)
  left.set_ylabel("tokens that changed expert since last probe (%)")
  right.set_ylabel("tokens already on their final expert (%)")
  right.set_ylim(0, 102)
  for ax in (left, right):
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
  left.set_title("Routing fluctuation (mean over MoE layers and seeds)")
  right.set_title("When probe tokens settle")
  return _save(fig, path)


def _annotate(ax, values: np.ndarray, image) -> None:
  for (i, j), v in np.ndenumerate(values):
    r, g, b, _ = image.cmap(image.norm(v))
    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
            color="white" if dark else "black")


def load_heatmap(results, path: pathlib.Path) -> pathlib.Path | None:
  """Per MoE layer, methods x experts: share of routed slots per expert (mean
  over the last 10% of steps and the seeds), on a diverging scale whose centre
  (white) is the balanced share 1/E."""
  results = [m for m in results if all(r.loads_E for r in m.runs)]
  if not results:
    return None
  layers = sorted({layer for m in results for r in m.runs for layer in r.loads_E})
  fig = Figure(figsize=(5.8 * len(layers), 0.5 * len(results) + 1.8),
               layout="constrained")
  axes = fig.subplots(1, len(layers), squeeze=False)
  for ax, layer in zip(axes[0], layers):
    rows = [m for m in results if all(layer in r.loads_E for r in m.runs)]
    num_e = max(len(r.loads_E[layer]) for m in rows for r in m.runs)
    values_ME = np.zeros((len(rows), num_e))
    for i, m in enumerate(rows):
      loads = np.mean([r.loads_E[layer] for r in m.runs], axis=0)
      values_ME[i, :len(loads)] = loads
    balanced = 1.0 / num_e
    norm = TwoSlopeNorm(vcenter=balanced, vmin=0.0,
                        vmax=max(2 * balanced, float(values_ME.max())))
    image = ax.imshow(values_ME, cmap="RdBu_r", norm=norm, aspect="auto")
    ax.set_xticks(range(num_e), [str(e) for e in range(num_e)], fontsize=7)
    ax.set_yticks(range(len(rows)), [m.method for m in rows], fontsize=8)
    ax.set_xlabel("expert")
    ax.set_title(f"{layer}: load share per expert (white = balanced, 1/E = "
                 f"{balanced:.3f})", fontsize=9)
    _annotate(ax, values_ME, image)
    bar = fig.colorbar(image, ax=ax, shrink=0.9)
    bar.set_ticks(sorted({0.0, balanced, norm.vmax}))
    bar.set_label("share of routed slots", fontsize=8)
  return _save(fig, path)


def domain_heatmaps(results, path: pathlib.Path) -> pathlib.Path | None:
  """For each method (rows) and MoE layer (columns), domains x experts: the share
  of a domain's held-out tokens whose top expert is e (last checkpoint, mean
  over seeds)."""
  results = [m for m in results
             if all(r.domain_GE and len(r.domain_names) > 1 for r in m.runs)]
  if not results:
    return None
  names = results[0].runs[0].domain_names
  layers = sorted({layer for m in results for r in m.runs for layer in r.domain_GE})
  fig = Figure(figsize=(5.2 * len(layers), 1.5 + 0.45 * len(names) * len(results)),
               layout="constrained")
  axes = fig.subplots(len(results), len(layers), squeeze=False)
  for row, m in zip(axes, results):
    for ax, layer in zip(row, layers):
      if not all(layer in r.domain_GE for r in m.runs):
        ax.axis("off")
        continue
      values_GE = np.mean([r.domain_GE[layer] for r in m.runs], axis=0)
      image = ax.imshow(values_GE, cmap="viridis", aspect="auto", vmin=0, vmax=1)
      ax.set_xticks(range(values_GE.shape[1]),
                    [str(e) for e in range(values_GE.shape[1])], fontsize=7)
      ax.set_yticks(range(len(names)), names, fontsize=8)
      ax.set_title(f"{m.method} / {layer}", fontsize=9)
      _annotate(ax, values_GE, image)
      fig.colorbar(image, ax=ax, shrink=0.9, ticks=(0, 0.5, 1))
  fig.suptitle("Expert by domain: share of each domain's held-out tokens per expert",
               fontsize=10)
  return _save(fig, path)

