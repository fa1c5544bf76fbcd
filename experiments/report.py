"""`report.md` of a router comparison: tables of mean ± std over seeds, the
papers' orderings judged by the spread rule of `experiments.stats`, figures."""

import dataclasses
import math
import pathlib
from collections.abc import Callable, Sequence

from experiments import plots, stats
from experiments.stats import Spread, spread
from experiments.summary import LAST_PROBES, SETTLE_AT, TAIL, RunSummary

# Headline valid PPL of the StableMoE paper (LM, base size); lower is better.
PAPER_PPL = {"stablemoe": 19.28, "hash": 19.63, "switch": 19.79, "base": 20.04,
             "dense": 23.02}
# Average BLEU of the StableMoE paper's multilingual translation (Table 3);
# higher is better.
PAPER_BLEU = {"stablemoe": 30.32, "base": 30.16, "hash": 29.94, "switch": 29.70,
              "dense": 28.31}
# Columns of the task-scores table: (score key, heading, format).
SCORE_COLUMNS = (("bleu", "test BLEU", ".2f"), ("chrf", "test chrF", ".2f"),
                 ("finetune_accuracy", "fine-tuned accuracy (%)", ".1f"),
                 ("finetune_baseline", "majority-class accuracy (%)", ".1f"))
PAPER_BASE_CHANGED_AFTER_20 = 0.409  # BASE tokens that change expert after 20%.
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
# EvoMoE reaches Switch's final PPL with 2x fewer samples (1.42x fewer FLOPs);
# a token ratio at most this counts as reproduced.
EVOMOE_TOKEN_RATIO = 0.6
LATE_FLUCTUATION = 0.10  # Learned routers still change > 10% of tokens late.
FIGURES = {
    "ppl_vs_tokens.png": "Valid perplexity against training tokens",
    "fluctuation.png": "Routing fluctuation against training step",
    "expert_load.png": "Expert load per MoE layer (methods x experts)",
    "expert_by_domain.png": "Expert-by-domain assignment of the held-out tokens",
}


@dataclasses.dataclass
class MethodResult:
  """A method's runs, one per seed."""

  method: str
  runs: list[RunSummary]

  def spread(self, measure: str | Callable[[RunSummary], float | None]
             ) -> Spread | None:
    """A measure (a RunSummary attribute or a function of one) over the seeds."""
    get = measure if callable(measure) else (lambda r: getattr(r, measure))
    return spread(get(r) for r in self.runs)


def group(runs: Sequence[RunSummary]) -> list[MethodResult]:
  """Runs grouped by method, in order of first appearance, seeds ascending."""
  out: dict[str, MethodResult] = {}
  for r in runs:
    out.setdefault(r.method, MethodResult(r.method, [])).runs.append(r)
  for result in out.values():
    result.runs.sort(key=lambda r: r.seed)
  return list(out.values())


def quality(results: Sequence[MethodResult]) -> tuple[str, str]:
  """(RunSummary attribute, name) of the PPL the claims judge: the test split's
  when every run has one (selection never saw it), else validation's."""
  if results and all(r.test_ppl is not None for m in results for r in m.runs):
    return "test_ppl", "test PPL"
  return "final_ppl", "valid PPL"


def choose_target(results: Sequence[MethodResult], given: float | None
                  ) -> tuple[float | None, str]:
  """(target valid PPL, the rule that chose it) for 'tokens to reach'."""
  if given is not None:
    return given, "given with --target-ppl"
  finals = {m.method: m.spread("final_ppl") for m in results}
  if finals.get("dense") is not None:
    return finals["dense"].mean, "the dense model's final valid PPL (mean over seeds)"
  means = [s.mean for s in finals.values() if s is not None]
  if not means:
    return None, "none (no run has an evaluation)"
  return max(means), "the worst mean final valid PPL among the methods (no dense run)"


def _tokens(result: MethodResult, target: float | None) -> str:
  if target is None:
    return "-"
  reached = [r.tokens_to_reach(target) for r in result.runs]
  hits = spread(t / 1e6 for t in reached if t is not None)
  if hits is None:
    return "not reached"
  text = hits.format(".2f") + "M"
  return text if hits.n == len(reached) else f"{text} ({hits.n}/{len(reached)} seeds)"


def _row(cells: Sequence[str]) -> str:
  return "| " + " | ".join(cells) + " |"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = [_row(head), "|" + "---|" * len(head)]
  return "\n".join(lines + [_row(r) for r in rows])


def _pct(s: Spread | None) -> str:
  return "-" if s is None else Spread(tuple(100 * v for v in s.values)).format(".1f")


def results_tables(results: Sequence[MethodResult], target: float | None) -> str:
  """Quality, routing and cost tables, one row per method."""
  quality_rows, routing_rows, cost_rows = [], [], []
  for m in results:
    entropy = m.spread(lambda r: None if not r.num_experts or r.router_entropy is None
                       else r.router_entropy / math.log(max(r.num_experts, 2)))
    flops = m.spread("active_ffn_flops")
    quality_rows.append([
        m.method, str(len(m.runs)), stats.fmt(m.spread("final_ppl")),
        stats.fmt(m.spread("test_ppl")), _tokens(m, target),
        stats.fmt(None if flops is None else Spread(tuple(v / 1e6 for v in
                                                          flops.values)), ".2f")])
    step = m.runs[0].changed_after_step
    routing_rows.append([
        m.method, _pct(m.spread("final_fluctuation")),
        _pct(m.spread("changed_after")) + ("" if step is None else f" ({step})"),
        stats.fmt(m.spread("load_cv"), ".3f"), stats.fmt(m.spread("drop_frac"), ".3f"),
        stats.fmt(m.spread("domain_nmi"), ".3f"), stats.fmt(entropy, ".3f"),
        stats.fmt(m.spread("router_drift"), ".3f")])
    cost_rows.append([m.method, stats.fmt(m.spread("step_s"), ".3f"),
                      stats.fmt(m.spread("wall_s"), ".0f")])
  return "\n\n".join([
      "**Quality**\n\n" + _table(
          ["method", "seeds", "valid PPL", "test PPL",
           "tokens to valid PPL <= target", "active FFN MFLOPs/token"],
          quality_rows),
      "**Routing**\n\n" + _table(
          ["method", f"fluctuation, last {LAST_PROBES} probes (%)",
           f"changed expert after {SETTLE_AT:.0%} (%) (probe step)", "load CV",
           "drop fraction", "expert-domain NMI", "router entropy / log E",
           "router drift"], routing_rows),
      "**Cost**\n\n" + _table(["method", "s/step (median)", "wall time per run (s)"],
                              cost_rows)])


def task_table(results: Sequence[MethodResult]) -> str:
  """The tasks' own test scores (BLEU, chrF, fine-tuned accuracy), one row per
  method; "" when no run has any."""
  keys = [c for c in SCORE_COLUMNS
          if any(c[0] in r.scores for m in results for r in m.runs)]
  if not keys:
    return ""
  scale = lambda key: 100.0 if "accuracy" in key or "baseline" in key else 1.0  # noqa: E731
  rows = [[m.method] + [stats.fmt(m.spread(
      lambda r, k=key: None if k not in r.scores else scale(k) * r.scores[k]),
      spec) for key, _, spec in keys] for m in results]
  return "\n**Task scores** (test split)\n\n" + _table(
      ["method"] + [head for _, head, _ in keys], rows) + "\n"


def stage_table(results: Sequence[MethodResult]) -> str:
  """Per stage of the multi-stage methods: load CV and router entropy over the
  stage's last 10% of steps, StableMoE's distilled-router agreement, EvoMoE's
  experts per token over its soft phase ("" when no method has stages)."""
  rows = []
  for m in results:
    staged = [r for r in m.runs if r.stages]
    if not staged:
      continue
    for i, stage in enumerate(staged[0].stages):
      at = lambda key: spread(getattr(r.stages[i], key) for r in staged  # noqa: E731
                              if len(r.stages) > i)
      entropy = spread(
          None if r.stages[i].entropy is None or not r.num_experts
          else r.stages[i].entropy / math.log(max(r.num_experts, 2))
          for r in staged if len(r.stages) > i)
      first, last = at("experts_per_token_first"), at("experts_per_token_last")
      rows.append([
          m.method, f"{i} {stage.name} ({stage.start}-{stage.end})",
          stats.fmt(at("load_cv"), ".3f"), stats.fmt(entropy, ".3f"),
          _pct(at("distill_agreement")),
          "-" if first is None else f"{first.format('.2f')} -> "
          f"{stats.fmt(last, '.2f')}"])
  if not rows:
    return ""
  return ("\n**Stages**\n\n" + _table(
      ["method", "stage (steps)", f"load CV, last {TAIL:.0%}",
       f"router entropy / log E, last {TAIL:.0%}",
       f"distilled router = stage-1 assignment (%), last {TAIL:.0%}",
       "experts per token, soft phase (first -> last 10%)"], rows) + """

- **distilled router = stage-1 assignment**: StableMoE's share of training
  tokens whose expert under the distilled token-id router equals the greedy
  centroid assignment argmax_i e_i . h (the stage-1 rule): at the end of stage
  1, how well distillation reproduces the assignment it was trained on; in
  stage 2, how far the frozen routing is from what the trained centroids
  would choose now.
- **experts per token, soft phase**: EvoMoE's DTS gate, tokens' mean number of
  experts above the threshold over the first and the last 10% of the stage's
  steps before `hard_step`.
""")


def paper_claims(results: Sequence[MethodResult]) -> str:
  """The papers' claims that this comparison can test, each with its numbers
  and a verdict by the spread rule."""
  attr, name = quality(results)
  by = {m.method: m for m in results}
  ppl = {m.method: m.spread(attr) for m in results}
  ppl = {k: v for k, v in ppl.items() if v is not None}
  task = results[0].runs[0].task if results else "lm"
  rows = _bleu_claims(results) if task == "seq2seq" else []
  order = [m for m in sorted(PAPER_PPL, key=PAPER_PPL.get) if m in ppl]
  for i, a in enumerate(order if task == "lm" else []):
    for b in order[i + 1:]:  # Every pair the paper orders, best first.
      rows.append((f"{a} < {b} ({name})", f"{PAPER_PPL[a]} < {PAPER_PPL[b]}",
                   f"{ppl[a].format()} vs {ppl[b].format()}",
                   stats.less(ppl[a], ppl[b])))
  moe = [m for m in ppl if m != "dense"]
  if "dense" in ppl and moe and task == "lm":
    verdicts = {m: stats.less(ppl[m], ppl["dense"]) for m in moe}
    rows.append((f"every MoE method beats dense ({name})", "all MoE < 23.02",
                 f"dense {ppl['dense'].format()}; "
                 + ", ".join(f"{m} {ppl[m].format()} ({v})"
                             for m, v in verdicts.items()),
                 stats.all_less(list(verdicts.values()))))
  if "evomoe" in by and "switch" in by:
    rows.append(_evomoe_claim(by["evomoe"], by["switch"]))
  for method, baseline, claim in MODERN_CLAIMS:
    if method in ppl and baseline in ppl and task == "lm":
      rows.append((f"{method} < {baseline} ({name}): {claim}", "lower PPL",
                   f"{ppl[method].format()} vs {ppl[baseline].format()}",
                   stats.less(ppl[method], ppl[baseline])))
  if "stablemoe" in by:
    changed = by["stablemoe"].spread("changed_after")
    if changed is not None:
      rows.append((f"stablemoe: no token changes expert after stage 1 "
                   f"({SETTLE_AT:.0%})", "0% by construction", _pct(changed) + "%",
                   stats.REPRODUCED if max(changed.values) == 0
                   else stats.CONTRADICTED))
  late = {m.method: m.spread("final_fluctuation") for m in results
          if m.method not in ("dense", "stablemoe", "hash")}
  late = {k: v for k, v in late.items() if v is not None}
  if late:
    rows.append((f"learned routers still change > {LATE_FLUCTUATION:.0%} of "
                 f"tokens per probe late (last {LAST_PROBES} probes)",
                 f"BASE {PAPER_BASE_CHANGED_AFTER_20:.1%} change after 20%",
                 ", ".join(f"{m} {_pct(v)}%" for m, v in late.items()),
                 stats.all_less([stats.above(v, LATE_FLUCTUATION)
                                 for v in late.values()])))
  if not rows:
    return "No claim of the papers can be checked with these methods.\n"
  return _table(["claim", "paper", "here (mean ± std over seeds)", "reproduced"],
                rows) + "\n"


def _bleu_claims(results: Sequence[MethodResult]) -> list[tuple]:
  """The translation orderings of the StableMoE paper (Table 3), judged on test
  BLEU (higher is better), and every MoE method against dense."""
  bleu = {m.method: m.spread(lambda r: r.scores.get("bleu")) for m in results}
  bleu = {k: v for k, v in bleu.items() if v is not None}
  rows = []
  order = [m for m in sorted(PAPER_BLEU, key=PAPER_BLEU.get, reverse=True)
           if m in bleu]
  for i, a in enumerate(order):
    for b in order[i + 1:]:
      rows.append((f"{a} > {b} (test BLEU)", f"{PAPER_BLEU[a]} > {PAPER_BLEU[b]}",
                   f"{bleu[a].format()} vs {bleu[b].format()}",
                   stats.less(bleu[b], bleu[a])))
  moe = [m for m in bleu if m != "dense"]
  if "dense" in bleu and moe:
    verdicts = {m: stats.less(bleu["dense"], bleu[m]) for m in moe}
    rows.append(("every MoE method beats dense (test BLEU)",
                 f"all MoE > {PAPER_BLEU['dense']}",
                 f"dense {bleu['dense'].format()}; "
                 + ", ".join(f"{m} {bleu[m].format()} ({v})"
                             for m, v in verdicts.items()),
                 stats.all_less(list(verdicts.values()))))
  return rows


def _evomoe_claim(evo: MethodResult, switch: MethodResult) -> tuple:
  """EvoMoE's tokens to reach Switch's final valid PPL, as a share of Switch's
  tokens, per seed (the same seed's Switch run)."""
  switch_by_seed = {r.seed: r for r in switch.runs}
  ratios, missed, evo_m, switch_m = [], [], [], []
  for r in evo.runs:
    sw = switch_by_seed.get(r.seed)
    if sw is None or sw.final_ppl is None:
      continue
    evo_tokens = r.tokens_to_reach(sw.final_ppl)
    if evo_tokens is None:
      missed.append(r.seed)
    else:
      switch_tokens = sw.tokens_to_reach(sw.final_ppl) or 1
      ratios.append(evo_tokens / switch_tokens)
      evo_m.append(evo_tokens / 1e6)
      switch_m.append(switch_tokens / 1e6)
  ratio = spread(ratios)
  here = ("never reached" if ratio is None else
          f"{ratio.format('.2f')}x Switch's tokens ({spread(evo_m).format('.2f')}M "
          f"vs {spread(switch_m).format('.2f')}M)") + (
              f"; not reached at seed(s) {missed}" if missed else "")
  if missed:
    verdict = stats.CONTRADICTED
  elif ratio is None:
    verdict = stats.ONE_SEED
  else:
    verdict = stats.below(ratio, EVOMOE_TOKEN_RATIO + 1e-12)
  return ("evomoe reaches Switch's final valid PPL with <= "
          f"{EVOMOE_TOKEN_RATIO}x its tokens", "2x fewer samples", here, verdict)


def write_report(root: pathlib.Path, runs: Sequence[RunSummary], *,
                 target_ppl: float | None, setup: Sequence[str],
                 command: str, tuning: str = "") -> pathlib.Path:
  """Writes `root/report.md` and its PNGs; returns the report's path."""
  results = group(runs)
  target, rule = choose_target(results, target_ppl)
  made = [plots.ppl_vs_tokens(results, target, root / "ppl_vs_tokens.png"),
          plots.fluctuation_vs_step(results, root / "fluctuation.png"),
          plots.load_heatmap(results, root / "expert_load.png"),
          plots.domain_heatmaps(results, root / "expert_by_domain.png")]
  figures = [f"![{FIGURES[p.name]}]({p.name})\n" for p in made if p is not None]
  target_text = "-" if target is None else f"{target:.2f}"
  probe_domains = ", ".join(sorted({d for r in runs for d in r.probe_domains})) or "-"
  _, judged = quality(results)
  if results and results[0].runs[0].task == "seq2seq":
    judged = ("test BLEU (the translation orderings), and EvoMoE's claim on the "
              "target tokens' valid PPL")
  text = f"""# Router comparison

Written by `experiments/compare_routers.py`:

```
{command}
```

## Setup

{chr(10).join(f"- {line}" for line in setup)}
{tuning}
## Results

Every cell is the mean ± sample standard deviation over the seeds (one value:
one seed). Target PPL for "tokens to valid PPL <= target": **{target_text}**,
{rule}.

{results_tables(results, target)}
{task_table(results)}{stage_table(results)}
- **valid PPL / test PPL**: perplexity at the last step on the validation split
  (which any tuning selected on) and on the test split (which neither training
  nor selection saw). At seed s every method saw the same batches in the same
  order and started from the same params wherever the shapes agree.
- **tokens to valid PPL <= target**: tokens at the first evaluation at or below
  the target (resolution: one evaluation interval), over the seeds that reach it.
- **active FFN MFLOPs/token**: forward FLOPs of the FFNs per token
  (`config.json` `derived`), equal across methods by `model.equal_flops`;
  nominal for routers that use several experts per token early (DSelect-k
  before its codes converge, EvoMoE's soft phase).
- **fluctuation**: share of probe tokens (the first held-out batch, routed as
  at evaluation; domain(s) {probe_domains}) whose top expert changed since the
  previous probe, mean over MoE layers and the last {LAST_PROBES} probes.
- **changed expert after {SETTLE_AT:.0%}**: share of probe tokens whose expert
  still changed after the last probe at or before {SETTLE_AT:.0%} of training
  (StableMoE's measure); where no probe is that early (EvoMoE routes only after
  its dense stage) the first probe is used; its step in parentheses.
- **load CV, drop fraction, router entropy**: over the last {TAIL:.0%} of steps,
  mean over MoE layers; the entropy (of the router's distribution over experts,
  per token) is divided by log E, so 1 is a uniform router.
- **router drift**: ||r_T - r_0|| / ||r_0|| of each MoE layer's router params
  between init and the last checkpoint, mean over layers (`-`: no params).
- **expert-domain NMI**: I(expert; domain) / H(domain) of the top experts of all
  held-out evaluation tokens at the last checkpoint, mean over MoE layers.
- **s/step, wall time**: the median logged step time and the time around each
  run (compilation, evaluation and checkpoints included) on a machine that
  may have been shared.

## The papers' orderings at this scale

Judged on the {judged}. {stats.RULE}

{paper_claims(results)}
## Figures

{chr(10).join(figures)}"""
  path = root / "report.md"
  path.write_text(text)
  return path
