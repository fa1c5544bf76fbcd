"""The comparison's measures on hand-made inputs."""

import numpy as np
import pytest

from experiments import report
from experiments.summary import (RunSummary, changed_after, domain_matrix,
                                 normalized_mutual_information)


def run(method, ppl, *, changed=None, steps=(100, 200)):
  return RunSummary(
      method=method, steps=steps[-1], tokens_per_step=1000, eval_steps=list(steps),
      eval_ppl=list(ppl), probe_steps=[], fluctuation=[], final_fluctuation=None,
      settle_steps=[], settled_share=[], changed_after=changed,
      changed_after_step=None, load_cv=None, drop_frac=None, loads_E={},
      probe_domains=[], domain_names=[], domain_GE={}, domain_nmi=None, wall_s=None)


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
  runs = [run("dense", [40.0, 30.0]), run("switch", [35.0, 25.0])]
  assert report.choose_target(runs, None)[0] == 30.0
  assert report.choose_target(runs[1:], None)[0] == 25.0
  assert report.choose_target(runs, 28.0) == (28.0, "given with --target-ppl")


def test_paper_claims_say_which_orderings_hold():
  runs = [run("dense", [30.0, 23.0]), run("switch", [30.0, 20.0]),
          run("stablemoe", [30.0, 21.0], changed=0.0)]
  table = report.paper_claims(runs)
  assert "| switch < dense (valid PPL) | 19.79 < 23.02 | 20.00 vs 23.00 | yes |" in table
  assert "| stablemoe < switch (valid PPL) | 19.28 < 19.79 | 21.00 vs 20.00 | **no** |" in table


def test_modern_methods_are_checked_against_their_baselines():
  runs = [run("topk", [30.0, 22.0]), run("qwen", [30.0, 21.0]),
          run("switch", [30.0, 20.0]), run("remoe", [30.0, 20.5]),
          run("stablemoe", [30.0, 25.0], changed=0.0),
          run("deepseek", [30.0, 24.0], changed=0.3)]
  table = report.paper_claims(runs)
  assert "| qwen < topk (valid PPL): global-batch" in table
  assert "| lower PPL | 21.00 vs 22.00 | yes |" in table
  assert "| lower PPL | 20.50 vs 20.00 | **no** |" in table  # remoe vs switch.
  assert "| lower PPL | 24.00 vs 22.00 | **no** |" in table  # deepseek vs topk.
  # Their routing fluctuation is set beside StableMoE's.
  assert "deepseek 30.0%" in table
