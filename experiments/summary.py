"""What one run of the comparison measured, read back from its workdir.

Shapes: E experts, G domains, N probe tokens.

Read from the files the trainer writes (`metrics.jsonl`, `router_loads.jsonl`,
`fluctuation.json`, `probes/`, `config.json`), `wall_time.json` (written by
`experiments.runs`), the held-out routes of the last checkpoint
(`experiments.routing`) and its router drift and test perplexity
(`experiments.final_state`).
"""

import dataclasses
import json
import math
import pathlib

import numpy as np

from experiments.final_state import final_state
from experiments.routing import heldout_routes
from moejax.metrics.writers import LOADS_FILE, read_metrics, series

WALL_TIME_FILE = "wall_time.json"
LAST_PROBES = 5  # Final fluctuation: mean over this many last probes.
TAIL = 0.1  # Load CV, drop fraction and loads: mean over the last 10% of steps.
SETTLE_AT = 0.2  # "Changed expert after 20% of training", as in StableMoE.


@dataclasses.dataclass
class StageSummary:
  """One stage of a run: router health over its first and last 10% of steps
  (None where the stage logged no such metric, e.g. a dense stage)."""

  name: str
  start: int  # First step after the stage's start (steps start..end].
  end: int
  load_cv: float | None  # Last 10% of the stage.
  entropy: float | None  # Nats, last 10%.
  # StableMoE: share of training tokens whose distilled-router expert equals
  # the greedy centroid assignment (the stage-1 rule), last 10% of the stage.
  distill_agreement: float | None
  # EvoMoE's DTS gate: experts per token over the first 10% and the last 10%
  # of the stage's soft phase (up to its `hard_step`, else the whole stage).
  experts_per_token_first: float | None
  experts_per_token_last: float | None


@dataclasses.dataclass
class RunSummary:
  """One method's numbers; None where the method has no such quantity (dense)."""

  method: str
  steps: int
  tokens_per_step: int
  eval_steps: list[int]
  eval_ppl: list[float]
  probe_steps: list[int]
  fluctuation: list[float]  # router/fluctuation per probe (mean over layers).
  final_fluctuation: float | None
  settle_steps: list[int]  # fluctuation.json: probe steps and the share of
  settled_share: list[float]  # probe tokens already on their final expert.
  changed_after: float | None  # Share of probe tokens that changed after ...
  changed_after_step: int | None  # ... this probe step (the last <= 20%).
  load_cv: float | None
  drop_frac: float | None
  loads_E: dict[str, np.ndarray]  # layer -> mean load share per expert.
  probe_domains: list[str]  # Domains among the trainer's probe tokens.
  domain_names: list[str]
  domain_GE: dict[str, np.ndarray]  # layer -> share of a domain's held-out
  # tokens (all evaluation batches) per expert, last checkpoint.
  domain_nmi: float | None  # I(expert; domain) / H(domain), mean over layers.
  wall_s: float | None
  seed: int = 0
  num_experts: int | None = None  # None for a dense model.
  router_entropy: float | None = None  # Nats, mean over layers, last 10%.
  router_drift: float | None = None  # ||r_T - r_0|| / ||r_0||, mean over layers.
  test_ppl: float | None = None  # On the test split (None: not evaluated).
  step_s: float | None = None  # Median seconds per training step (logged).
  active_ffn_flops: int | None = None  # Forward, per token, the last stage.
  stages: list[StageSummary] = dataclasses.field(default_factory=list)
  task: str = "lm"  # `data.task` of the run.
  # The task's own scores on the test split (`experiments.task_scores`): BLEU
  # and chrF of a translation run, fine-tuned accuracy of a masked LM.
  scores: dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def final_ppl(self) -> float | None:
    return self.eval_ppl[-1] if self.eval_ppl else None

  def tokens_to_reach(self, target_ppl: float) -> int | None:
    """Tokens seen at the first evaluation with PPL <= target (None: never)."""
    for step, ppl in zip(self.eval_steps, self.eval_ppl):
      if ppl <= target_ppl:
        return step * self.tokens_per_step
    return None


def _floats(values) -> list[float]:
  return [float(v) for v in values]  # "inf"/"nan" strings parse too.


def _tail_mean(rows: list[dict], key: str, start: float) -> float | None:
  values = [float(r[key]) for r in rows if key in r and r["step"] > start]
  if not values:
    values = [float(r[key]) for r in rows if key in r][-1:]
  return float(np.mean(values)) if values else None


def _window_mean(rows: list[dict], key: str, lo: float, hi: float, *,
                 nearest: str | None = None) -> float | None:
  """Mean of `key` over the rows with lo < step <= hi; with `nearest`
  ("first"/"last") and no row there, the first row after lo or the last at or
  before hi (None: no row carries `key`)."""
  values = [float(r[key]) for r in rows if key in r and lo < r["step"] <= hi]
  if not values and nearest:
    pool = [r for r in rows if key in r and
            (r["step"] > lo if nearest == "first" else r["step"] <= hi)]
    pool.sort(key=lambda r: r["step"])
    values = [float(pool[0 if nearest == "first" else -1][key])] if pool else []
  return float(np.mean(values)) if values else None


def stage_summaries(rows: list[dict], stages: list[dict]) -> list[StageSummary]:
  """Per stage of `config.json`'s `stages`, router health over the stage's
  first and last TAIL of steps (the rows carry their `stage`)."""
  ends, start = [], 0
  for entry in stages:
    ends.append((start, start + entry["steps"]))
    start += entry["steps"]
  out = []
  for i, (lo, hi) in enumerate(ends):
    own = [r for r in rows if r.get("stage", i) == i]
    width = max(TAIL * (hi - lo), 1)
    last = lambda key: _window_mean(own, key, hi - width, hi)  # noqa: E731
    hard = dict(stages[i]["model"]["moe"]["router_options"]).get("hard_step")
    soft_end = lo + hard if hard is not None and 0 < hard < hi - lo else hi
    soft_width = max(TAIL * (soft_end - lo), 1)
    out.append(StageSummary(
        name=stages[i]["name"], start=lo, end=hi,
        load_cv=last("router/load_cv"), entropy=last("router/entropy"),
        distill_agreement=last("router/distill_agreement"),
        experts_per_token_first=_window_mean(
            own, "router/experts_per_token", lo, lo + soft_width,
            nearest="first"),
        experts_per_token_last=_window_mean(
            own, "router/experts_per_token", soft_end - 1 - soft_width,
            soft_end - 1, nearest="last")))  # `hard_step` itself is top-1.
  return out


def _tail_loads(workdir: pathlib.Path, start: float) -> dict[str, np.ndarray]:
  if not (workdir / LOADS_FILE).exists():
    return {}
  rows = read_metrics(workdir, LOADS_FILE)
  keys = sorted({k for r in rows for k in r if k.endswith("/load")})
  out = {}
  for key in keys:
    with_key = [r for r in rows if key in r]
    tail = [r[key] for r in with_key if r["step"] > start] or [with_key[-1][key]]
    out[key.split("/")[1]] = np.mean(np.asarray(tail, np.float64), axis=0)
  return out


def _settling(workdir: pathlib.Path) -> tuple[list[int], list[float]]:
  path = workdir / "fluctuation.json"
  if not path.exists():
    return [], []
  curve = json.loads(path.read_text())
  return curve["steps"], _floats(curve["settled_share"])


def changed_after(steps: list[int], settled_share: list[float], step: float
                  ) -> tuple[float | None, int | None]:
  """(share of probe tokens whose expert changed after the last probe <= `step`
  (the first probe if none is), that probe's step); (None, None) without probes.

  A token changed after probe s iff it is not yet settled at s, so the share is
  1 - settled_share(s)."""
  if not steps:
    return None, None
  before = [i for i, s in enumerate(steps) if s <= step]
  i = before[-1] if before else 0
  return 1.0 - settled_share[i], int(steps[i])


def domain_matrix(experts_N: np.ndarray, domains_N: np.ndarray, num_domains: int,
                  num_experts: int) -> np.ndarray:
  """float[G, E]: share of each domain's tokens whose top expert is e."""
  counts_GE = np.zeros((num_domains, num_experts))
  np.add.at(counts_GE, (domains_N, experts_N), 1.0)
  return counts_GE / np.maximum(counts_GE.sum(1, keepdims=True), 1.0)


def normalized_mutual_information(experts_N: np.ndarray, domains_N: np.ndarray
                                  ) -> float:
  """I(expert; domain) / H(domain): 0 when experts ignore the domain, 1 when
  the expert determines it."""
  joint = np.zeros((domains_N.max() + 1, experts_N.max() + 1))
  np.add.at(joint, (domains_N, experts_N), 1.0)
  joint /= joint.sum()
  p_g, p_e = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
  nz = joint > 0
  mi = float(np.sum(joint[nz] * np.log(joint[nz] / (p_g @ p_e)[nz])))
  h_g = float(-np.sum(p_g[p_g > 0] * np.log(p_g[p_g > 0])))
  return mi / h_g if h_g > 0 else 0.0


def _probe_domains(workdir: pathlib.Path) -> list[str]:
  """The domains present among the trainer's probe tokens."""
  path = workdir / "probes" / "inputs.npz"
  if not path.exists():
    return []
  with np.load(path) as f:
    return [str(f["domain_names"][d]) for d in np.unique(f["domains"])]


def _domains(workdir: pathlib.Path, num_experts: int
             ) -> tuple[list[str], dict[str, np.ndarray], float | None]:
  routes, domains_N, names = heldout_routes(workdir)
  matrices = {layer: domain_matrix(r, domains_N, len(names), num_experts)
              for layer, r in sorted(routes.items())}
  nmi = [normalized_mutual_information(r, domains_N) for r in routes.values()]
  return names, matrices, (float(np.mean(nmi)) if nmi and len(names) > 1 else None)


def median_step_seconds(rows: list[dict], tokens_per_step: int) -> float | None:
  """Median training-step time from the logged `perf/tokens_per_sec` (rows
  without a timed step excluded)."""
  rates = [float(r["perf/tokens_per_sec"]) for r in rows
           if float(r.get("perf/tokens_per_sec", 0.0)) > 0]
  return float(np.median([tokens_per_step / r for r in rates])) if rates else None


def _mean_over_layers(values: dict) -> float | None:
  kept = [v for v in values.values() if v is not None]
  return float(np.mean(kept)) if kept else None


SCORES_FILE = "task_scores.json"  # Written by `experiments.task_scores`.


def row_tokens(data: dict) -> int:
  """Tokens of one training row of a run's `data` config: a window's L, a
  seq2seq row's source and target sides together."""
  if data.get("task") == "seq2seq":
    return data["seq_len"] + (data.get("target_len") or data["seq_len"])
  return data["seq_len"]


def read_run(workdir: str | pathlib.Path, method: str, *,
             test: bool = False) -> RunSummary:
  """The summary of the finished run in `workdir`; with `test`, its test-split
  perplexity too (never asked for by a tuning sweep)."""
  workdir = pathlib.Path(workdir)
  config = json.loads((workdir / "config.json").read_text())
  steps = config["train"]["steps"]
  tokens_per_step = config["train"]["batch_size"] * row_tokens(config["data"])
  rows = read_metrics(workdir)
  eval_steps, eval_ppl = series(rows, "eval/ppl")
  probe_steps, fluctuation = series(rows, "router/fluctuation")
  start = (1.0 - TAIL) * steps
  settle_steps, settled_share = _settling(workdir)
  changed, changed_step = changed_after(settle_steps, settled_share,
                                        round(SETTLE_AT * steps))
  names, domain_GE, nmi = _domains(workdir, config["model"]["moe"]["num_experts"])
  wall = workdir / WALL_TIME_FILE
  state = final_state(workdir, test=test)
  flops = config.get("derived", {}).get("active_ffn_flops_per_token", {})
  return RunSummary(
      method=method, steps=steps, tokens_per_step=tokens_per_step,
      eval_steps=eval_steps, eval_ppl=_floats(eval_ppl),
      probe_steps=probe_steps, fluctuation=_floats(fluctuation),
      final_fluctuation=(float(np.mean(fluctuation[-LAST_PROBES:]))
                         if fluctuation else None),
      settle_steps=settle_steps, settled_share=settled_share,
      changed_after=changed, changed_after_step=changed_step,
      load_cv=_tail_mean(rows, "router/load_cv", start),
      drop_frac=_tail_mean(rows, "router/drop_frac", start),
      loads_E=_tail_loads(workdir, start),
      probe_domains=_probe_domains(workdir), domain_names=names,
      domain_GE=domain_GE, domain_nmi=nmi,
      wall_s=(json.loads(wall.read_text())["seconds"] if wall.exists() else None),
      seed=config["train"]["seed"],
      num_experts=(config["model"]["moe"]["num_experts"]
                   if config["model"]["moe_layers"]
                   or config["model"].get("encoder_moe_layers") else None),
      router_entropy=_tail_mean(rows, "router/entropy", start),
      router_drift=_mean_over_layers(state["router_drift"]),
      test_ppl=(state.get("test") or {}).get("ppl"),
      step_s=median_step_seconds(rows, tokens_per_step),
      active_ffn_flops=list(flops.values())[-1] if flops else None,
      stages=(stage_summaries(rows, config["stages"])
              if len(config.get("stages") or []) > 1 else []),
      task=config["data"].get("task", "lm"),
      scores=(json.loads((workdir / SCORES_FILE).read_text())["scores"]
              if (workdir / SCORES_FILE).exists() else {}))


def fmt(value: float | None, spec: str = ".3f") -> str:
  """A table cell: `-` for a missing or non-finite value."""
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "-"
  return format(value, spec)
