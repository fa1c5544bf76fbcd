"""The comparison's measures on hand-made inputs."""

import dataclasses

import numpy as np
import pytest

from experiments import report, stats
from experiments.summary import (RunSummary, changed_after, domain_matrix,
                                 median_step_seconds,
                                 normalized_mutual_information, stage_summaries)


def run(method, ppl, *, changed=None, steps=(100, 200), seed=0, test=None,
        fluctuation=None):
  return RunSummary(
      method=method, steps=steps[-1], tokens_per_step=1000, eval_steps=list(steps),
      eval_ppl=list(ppl), probe_steps=[], fluctuation=[],
      final_fluctuation=fluctuation, settle_steps=[], settled_share=[],
      changed_after=changed, changed_after_step=None, load_cv=None, drop_frac=None,
      loads_E={}, probe_domains=[], domain_names=[], domain_GE={}, domain_nmi=None,
      wall_s=None, seed=seed, test_ppl=test)


def seeds(method, finals, **kwargs):
  """One run per seed, final valid PPL `finals[s]` at seed s."""
  return [run(method, [60.0, f], seed=s, **kwargs) for s, f in enumerate(finals)]


def test_changed_after_reads_the_last_probe_at_or_before_the_step():
  steps, share = [10, 20, 30, 40], [0.1, 0.5, 0.9, 1.0]
  assert changed_after(steps, share, 20) == (0.5, 20)  # 1 - 0.5 at step 20.
  assert changed_after(steps, share, 25) == (0.5, 20)
  assert changed_after(steps, share, 5) == (pytest.approx(0.9), 10)  # First probe.
  assert changed_after([], [], 20) == (None, None)


def test_domain_matrix_rows_are_shares_of_each_domain():
  experts = np.array([0, 0, 1, 2])
  domains = np.array([0, 0, 0, 1])
  # Domain 0: 2 of 3 tokens on expert 0, 1 on expert 1; domain 1: all on 2.
  np.testing.assert_allclose(domain_matrix(experts, domains, 2, 3),
                             [[2 / 3, 1 / 3, 0], [0, 0, 1]])


def test_nmi_is_one_when_the_expert_names_the_domain_and_zero_when_independent():
  domains = np.array([0, 0, 1, 1])
  assert normalized_mutual_information(np.array([3, 3, 1, 1]), domains) == (
      pytest.approx(1.0))
  assert normalized_mutual_information(np.array([0, 1, 0, 1]), domains) == (
      pytest.approx(0.0))


def test_tokens_to_reach_is_the_first_evaluation_at_or_below_target():
  r = run("switch", [30.0, 20.0], steps=(100, 200))
  assert r.tokens_to_reach(25.0) == 200 * 1000
  assert r.tokens_to_reach(30.0) == 100 * 1000
  assert r.tokens_to_reach(10.0) is None


def test_target_defaults_to_dense_then_to_the_worst_final_ppl():
  results = report.group(seeds("dense", [30.0, 32.0]) + seeds("switch", [25.0, 27.0]))
  assert report.choose_target(results, None)[0] == 31.0  # Mean over seeds.
  assert report.choose_target(results[1:], None)[0] == 26.0
  assert report.choose_target(results, 28.0) == (28.0, "given with --target-ppl")


def test_modern_methods_are_checked_against_their_baselines():
  results = report.group(
      seeds("topk", [22.0, 22.1, 22.2]) + seeds("qwen", [21.0, 21.1, 21.2])
      + seeds("switch", [20.0, 20.1, 20.2]) + seeds("remoe", [20.5, 20.6, 20.7])
      + seeds("deepseek", [24.0, 24.1, 24.2]))
  table = report.paper_claims(results)
  rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()}
  qwen = next(v for k, v in rows.items() if k.startswith("qwen < topk"))
  assert "global-batch" in qwen and qwen.endswith("| yes |")
  remoe = next(v for k, v in rows.items() if k.startswith("remoe < switch"))
  assert remoe.endswith("| **no** |")
  deepseek = next(v for k, v in rows.items() if k.startswith("deepseek < topk"))
  assert deepseek.endswith("| **no** |")


def test_seeds_aggregate_to_mean_and_sample_std():
  results = report.group(seeds("switch", [20.0, 22.0, 24.0])[::-1]
                         + seeds("dense", [30.0]))
  assert [m.method for m in results] == ["switch", "dense"]
  assert [r.seed for r in results[0].runs] == [0, 1, 2]  # Sorted by seed.
  ppl = results[0].spread("final_ppl")
  # mean 22; sample std sqrt(((-2)^2 + 0 + 2^2) / 2) = 2.
  assert (ppl.n, ppl.mean, ppl.std) == (3, 22.0, 2.0)
  assert ppl.format() == "22.00 ± 2.00"
  assert results[1].spread("final_ppl").format() == "30.00"  # One seed: no ±.
  assert results[1].spread("test_ppl") is None
  assert stats.spread([1.0, None, float("inf"), 3.0]).values == (1.0, 3.0)
  table = report.results_tables(results, target=23.0)
  # Switch reaches 23 at step 200 (1000 tokens/step) in seeds 0 and 1 only.
  assert "| switch | 3 | 22.00 ± 2.00 | - | 0.20 ± 0.00M (2/3 seeds) |" in table


def test_ordering_is_reproduced_only_beyond_the_sum_of_spreads():
  a, b = stats.Spread((10.0, 12.0)), stats.Spread((15.0, 17.0))  # std 1.414 each.
  assert stats.less(a, b) == stats.REPRODUCED  # 5 > 2.83.
  assert stats.less(b, a) == stats.CONTRADICTED
  close = stats.Spread((12.0, 16.0))  # mean 14, std 2.83: 3 < 1.41 + 2.83.
  assert stats.less(a, close) == stats.WITHIN_SPREAD
  assert stats.less(stats.Spread((1.0,)), b) == stats.ONE_SEED
  assert stats.all_less([stats.REPRODUCED, stats.REPRODUCED]) == stats.REPRODUCED
  assert stats.all_less([stats.REPRODUCED, stats.WITHIN_SPREAD]) == (
      stats.WITHIN_SPREAD)
  assert stats.all_less([stats.WITHIN_SPREAD, stats.CONTRADICTED]) == (
      stats.CONTRADICTED)
  assert stats.below(a, 13.0) == stats.REPRODUCED  # 11 + 1.41 < 13.
  assert stats.below(a, 12.0) == stats.WITHIN_SPREAD
  assert stats.above(a, 9.0) == stats.REPRODUCED  # 11 - 1.41 > 9.
  assert stats.above(a, 13.0) == stats.CONTRADICTED


def test_paper_claims_judge_orderings_by_the_spread():
  results = report.group(
      seeds("dense", [23.0, 23.2, 23.4]) + seeds("switch", [20.0, 20.2, 20.4])
      + seeds("stablemoe", [20.1, 20.3, 20.5], changed=0.0)
      + seeds("base", [30.0, 30.0, 30.0], fluctuation=0.05))
  table = report.paper_claims(results)
  assert ("| switch < dense (valid PPL) | 19.79 < 23.02 | 20.20 ± 0.20 vs "
          "23.20 ± 0.20 | yes |") in table
  # StableMoE is 0.1 worse than Switch, well within their 0.4 of spread.
  assert ("| stablemoe < switch (valid PPL) | 19.28 < 19.79 | 20.30 ± 0.20 vs "
          "20.20 ± 0.20 | within spread |") in table
  assert "| every MoE method beats dense (valid PPL) |" in table
  # BASE > dense, so not every MoE wins; and BASE's late fluctuation below.
  assert table.count("| **no** |") == 3
  assert "| base < dense (valid PPL) | 20.04 < 23.02 | 30.00 ± 0.00 vs" in table
  assert "| stablemoe: no token changes expert after stage 1 (20%) |" in table
  # BASE changes 5% +- 0 late: below the 10% the paper's learned routers keep.
  assert "base 5.0 ± 0.0% | **no** |" in table


def test_claims_use_the_test_split_when_every_run_has_it():
  results = report.group(seeds("dense", [23.0, 23.0], test=30.0)
                         + seeds("switch", [20.0, 20.0], test=31.0))
  assert report.quality(results) == ("test_ppl", "test PPL")
  assert "| switch < dense (test PPL) |" in report.paper_claims(results)


def test_step_seconds_are_the_median_over_logged_rows():
  rows = [{"perf/tokens_per_sec": 2000.0}, {"perf/tokens_per_sec": 0.0},
          {"perf/tokens_per_sec": 1000.0}, {"perf/tokens_per_sec": 500.0}, {}]
  assert median_step_seconds(rows, 1000) == 1.0  # Median of 0.5, 1, 2 s.


def _stage(name, steps, **options):
  return {"name": name, "steps": steps,
          "model": {"moe": {"router_options": sorted(options.items())}}}


def test_stage_summaries_read_each_stage_tail_and_the_soft_phase():
  # StableMoE-like: stage 0 steps 1-20, stage 1 steps 21-100 (10%: 2 and 8
  # steps); EvoMoE-like stage 2 (101-200) with hard_step 50: soft phase 101-150.
  stages = [_stage("distill", 20), _stage("frozen", 80),
            _stage("dts", 100, hard_step=50)]
  rows = [{"step": s, "stage": 0, "router/load_cv": 0.1 * s,
           "router/distill_agreement": 0.9} for s in range(1, 21)]
  rows += [{"step": s, "stage": 1, "router/load_cv": 1.0,
            "router/distill_agreement": 0.5 if s > 92 else 0.0}
           for s in range(21, 101)]
  rows += [{"step": s, "stage": 2, "router/experts_per_token":
            8.0 if s <= 105 else (2.0 if s <= 149 else 1.0)}
           for s in range(101, 201)]
  rows.append({"step": 20, "stage": 0, "eval/ppl": 50.0})  # No router keys.
  first, second, third = stage_summaries(rows, stages)
  assert (first.name, first.start, first.end) == ("distill", 0, 20)
  np.testing.assert_allclose(first.load_cv, (1.9 + 2.0) / 2)  # Steps 19, 20.
  assert first.distill_agreement == 0.9 and first.experts_per_token_first is None
  assert (second.load_cv, second.distill_agreement) == (1.0, 0.5)  # Steps 93-100.
  # Soft phase: first 5 steps (101-105) and the 5 before hard_step (145-149).
  assert (third.experts_per_token_first, third.experts_per_token_last) == (8.0, 2.0)
  assert third.load_cv is None
  table = report.stage_table(report.group([
      dataclasses.replace(run("stablemoe", [40.0]), stages=[first, second],
                          num_experts=8)]))
  assert "| stablemoe | 0 distill (0-20) | 1.950 | - | 90.0 | - |" in table
  assert "| stablemoe | 1 frozen (20-100) | 1.000 | - | 50.0 | - |" in table
  assert report.stage_table(report.group([run("switch", [40.0])])) == ""


def test_soft_phase_edges_fall_back_to_the_nearest_logged_rows():
  # Logged every 20 steps: no row in steps 1-5 or 44-49 of the soft phase (1-50).
  rows = [{"step": s, "stage": 0, "router/experts_per_token": e}
          for s, e in ((20, 7.0), (40, 3.0), (60, 1.0), (80, 1.0))]
  (stage,) = stage_summaries(rows, [_stage("dts", 100, hard_step=50)])
  assert (stage.experts_per_token_first, stage.experts_per_token_last) == (7.0, 3.0)
