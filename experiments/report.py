"""`report.md` of a router comparison: the table, the papers' claims checked
against it, and the figures."""

import pathlib
from collections.abc import Sequence

from experiments import plots
from experiments.summary import (LAST_PROBES, SETTLE_AT, TAIL, RunSummary, fmt)

# Headline valid PPL of the StableMoE paper (LM, base size); lower is better.
PAPER_PPL = {"stablemoe": 19.28, "hash": 19.63, "switch": 19.79, "base": 20.04,
             "dense": 23.02}
PAPER_BASE_CHANGED_AFTER_20 = 0.409  # BASE tokens that change expert after 20%.
PAPER_EVOMOE_SPEEDUP = 2.0  # EvoMoE reaches Switch's PPL with 2x fewer samples.
# Later methods against the baseline their papers beat: (method, baseline,
# what the paper reports).
MODERN_CLAIMS = (
    ("qwen", "topk", "global-batch balance loss beats the micro-batch one "
     "(Qiu et al. 2025)"),
    ("deepseek", "topk", "fine-grained + shared experts with aux-loss-free "
     "balancing beat GShard top-2 (DeepSeekMoE; Wang et al. 2024)"),
    ("remoe", "switch", "ReLU routing beats top-k routing at equal active "
     "FLOPs (Wang et al. 2025)"),
)
FIGURES = {
    "ppl_vs_tokens.png": "Valid perplexity against training tokens",
    "fluctuation.png": "Routing fluctuation against training step",
    "expert_load.png": "Expert load per MoE layer (methods x experts)",
    "expert_by_domain.png": "Expert-by-domain assignment of the held-out tokens",
}


def choose_target(runs: Sequence[RunSummary], given: float | None
                  ) -> tuple[float | None, str]:
  """(target PPL, the rule that chose it) for the 'tokens to reach' column."""
  if given is not None:
    return given, "given with --target-ppl"
  by_method = {r.method: r for r in runs}
  if "dense" in by_method and by_method["dense"].final_ppl is not None:
    return by_method["dense"].final_ppl, "the dense model's final valid PPL"
  finals = [r.final_ppl for r in runs if r.final_ppl is not None]
  if not finals:
    return None, "none (no run has an evaluation)"
  return max(finals), "the worst final valid PPL among the methods (no dense run)"


def _tokens(n: int | None) -> str:
  return "not reached" if n is None else f"{n / 1e6:.2f}M"


def results_table(runs: Sequence[RunSummary], target: float | None) -> str:
  head = ("| method | valid PPL | tokens to PPL <= target | fluctuation, last "
          f"{LAST_PROBES} probes | changed expert after {SETTLE_AT:.0%} (probe step) "
          "| load CV | drop fraction | expert-domain NMI | wall time (s) |")
  lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
  for r in runs:
    reach = r.tokens_to_reach(target) if target is not None else None
    changed = ("-" if r.changed_after is None else
               f"{r.changed_after:.1%} ({r.changed_after_step})")
    lines.append(
        f"| {r.method} | {fmt(r.final_ppl, '.2f')} | {_tokens(reach)} | "
        f"{fmt(None if r.final_fluctuation is None else 100 * r.final_fluctuation, '.2f')}"
        f"{'%' if r.final_fluctuation is not None else ''} | {changed} | "
        f"{fmt(r.load_cv)} | {fmt(r.drop_frac)} | {fmt(r.domain_nmi)} | "
        f"{fmt(r.wall_s, '.0f')} |")
  return "\n".join(lines)


def _verdict(ok: bool | str) -> str:
  if isinstance(ok, str):
    return ok
  return "yes" if ok else "**no**"


def paper_claims(runs: Sequence[RunSummary]) -> str:
  """The papers' orderings that this comparison can test, each with its numbers."""
  ppl = {r.method: r.final_ppl for r in runs if r.final_ppl is not None}
  rows = []
  order = [m for m in sorted(PAPER_PPL, key=PAPER_PPL.get) if m in ppl]
  for i, a in enumerate(order):  # Every pair the paper orders, best first.
    for b in order[i + 1:]:
      rows.append((f"{a} < {b} (valid PPL)", f"{PAPER_PPL[a]} < {PAPER_PPL[b]}",
                   f"{ppl[a]:.2f} vs {ppl[b]:.2f}", ppl[a] < ppl[b]))
  if len(order) > 2:
    here = sorted(order, key=ppl.get)
    rows.append(("rank order of " + ", ".join(order), " < ".join(order),
                 " < ".join(f"{m} {ppl[m]:.2f}" for m in here), here == order))
  moe = [m for m in ppl if m != "dense"]
  if "dense" in ppl and moe:
    worse = [m for m in moe if ppl[m] >= ppl["dense"]]
    rows.append(("every MoE method beats dense", "all MoE < 23.02",
                 f"dense {ppl['dense']:.2f}; not better: "
                 + (", ".join(f"{m} {ppl[m]:.2f}" for m in worse) or "none"),
                 not worse))
  by = {r.method: r for r in runs}
  if "evomoe" in by and "switch" in by and by["switch"].final_ppl is not None:
    sw = by["switch"]
    sw_tokens = sw.tokens_to_reach(sw.final_ppl)
    evo_tokens = by["evomoe"].tokens_to_reach(sw.final_ppl)
    speedup = sw_tokens / evo_tokens if evo_tokens else None
    here = (f"Switch {sw.final_ppl:.2f} at {_tokens(sw_tokens)}; evomoe at "
            f"{_tokens(evo_tokens)}" + (f" ({speedup:.2f}x)" if speedup else ""))
    if "dense" in by:
      here += f"; dense at {_tokens(by['dense'].tokens_to_reach(sw.final_ppl))}"
    verdict = ("yes" if speedup and speedup >= PAPER_EVOMOE_SPEEDUP else
               "partly (fewer, not 2x)" if speedup and speedup > 1 else "**no**")
    rows.append(("evomoe reaches Switch's final PPL with 2x fewer tokens",
                 f"{PAPER_EVOMOE_SPEEDUP:.1f}x fewer", here, verdict))
  for method, baseline, claim in MODERN_CLAIMS:
    if method in ppl and baseline in ppl:
      rows.append((f"{method} < {baseline} (valid PPL): {claim}", "lower PPL",
                   f"{ppl[method]:.2f} vs {ppl[baseline]:.2f}",
                   ppl[method] < ppl[baseline]))
  changed = {r.method: r.changed_after for r in runs if r.changed_after is not None}
  if "stablemoe" in changed:
    rows.append((f"stablemoe: no token changes expert after stage 1 "
                 f"({SETTLE_AT:.0%})", "0% by construction",
                 f"{changed['stablemoe']:.1%}", changed["stablemoe"] == 0))
    others = {m: v for m, v in changed.items() if m not in ("stablemoe", "hash")}
    if others:
      rows.append(("stablemoe changes fewer tokens after 20% than learned routers",
                   f"BASE {PAPER_BASE_CHANGED_AFTER_20:.1%} vs StableMoE 0%",
                   ", ".join(f"{m} {v:.1%}" for m, v in others.items()),
                   all(changed["stablemoe"] < v for v in others.values())))
  if not rows:
    return "No method pair of the papers' headline is in this comparison.\n"
  lines = ["| claim | paper | here | reproduced |", "|---|---|---|---|"]
  lines += [f"| {c} | {p} | {h} | {_verdict(ok)} |" for c, p, h, ok in rows]
  return "\n".join(lines) + "\n"


def write_report(root: pathlib.Path, runs: Sequence[RunSummary], *,
                 target_ppl: float | None, setup: Sequence[str],
                 command: str) -> pathlib.Path:
  """Writes `root/report.md` and its PNGs; returns the report's path."""
  target, rule = choose_target(runs, target_ppl)
  made = [plots.ppl_vs_tokens(runs, target, root / "ppl_vs_tokens.png"),
          plots.fluctuation_vs_step(runs, root / "fluctuation.png"),
          plots.load_heatmap(runs, root / "expert_load.png"),
          plots.domain_heatmaps(runs, root / "expert_by_domain.png")]
  figures = [f"![{FIGURES[p.name]}]({p.name})\n" for p in made if p is not None]
  target_text = "-" if target is None else f"{target:.2f}"
  probe_domains = ", ".join(sorted({d for r in runs for d in r.probe_domains})) or "-"
  text = f"""# Router comparison

Written by `experiments/compare_routers.py`:

```
{command}
```

## Setup

{chr(10).join(f"- {line}" for line in setup)}

## Results

Target PPL for "tokens to PPL <= target": **{target_text}**, {rule}.

{results_table(runs, target)}

- **valid PPL**: held-out perplexity at the last step. Every method saw the same
  batches in the same order; the presets give every method the dense model's
  active FFN FLOPs per token, except where a method's paper routes a token to
  several experts (DSelect-k before its codes converge, EvoMoE's soft phase).
- **tokens to PPL <= target**: tokens at the first evaluation whose PPL is at or
  below the target (resolution: one evaluation interval).
- **fluctuation**: share of probe tokens (the trainer's probe set, the first
  held-out batch, routed as at evaluation; here from domain(s)
  {probe_domains}) whose top expert changed since the previous probe, mean over
  MoE layers and over the last {LAST_PROBES} probes.
- **changed expert after {SETTLE_AT:.0%}**: share of probe tokens whose expert
  still changed after the last probe at or before {SETTLE_AT:.0%} of training
  (StableMoE's measure; from `fluctuation.json`). Where no probe is that early
  (EvoMoE routes only after its dense stage) the first probe is used; the step
  is in parentheses.
- **load CV, drop fraction**: coefficient of variation of the expert loads and
  share of routed slots dropped for capacity, mean over MoE layers and over the
  last {TAIL:.0%} of steps.
- **expert-domain NMI**: I(expert; domain) / H(domain) of the top experts of all
  held-out evaluation tokens at the last checkpoint, mean over MoE layers (0: routing ignores the domain; 1: the expert
  identifies the domain).
- **wall time**: measured by the script around training, summed over the
  invocations that trained the method (compilation, evaluation and checkpoints
  included; the machine may have been shared).

## The papers' orderings at this scale

{paper_claims(runs)}
One seed per method: the spread between seeds was not measured, so small
differences may not be meaningful.

## Figures

{chr(10).join(figures)}"""
  path = root / "report.md"
  path.write_text(text)
  return path
