"""compare_routers and tune on a tiny budget: a report row per method over seeds,
the figures, choices made on validation only, and invocations that skip the
finished runs."""

import json
import pathlib
import sysconfig
import time

from experiments import compare_routers, tune

METHODS = ("dense", "switch")
TINY_MODEL = ("model.num_layers=2", "model.d_model=32", "model.num_heads=2",
              "model.d_ff=64", "model.num_experts=4", "data.eval_batches=2")


def write_corpus(directory: pathlib.Path) -> str:
  """Two domains of real text from the Python installation: code and prose."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  directory.mkdir()
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  code = "".join((stdlib / f).read_text() for f in ("argparse.py", "textwrap.py"))
  docs = "\n\n".join(topics.topics.values())
  (directory / "code.txt").write_text(code[:60_000])
  (directory / "docs.txt").write_text(docs[:60_000])
  return str(directory / "*.txt")


def tiny_args(corpus: str, root: pathlib.Path, methods) -> list[str]:
  argv = ["--corpus", corpus, "--budget-tokens", str(20 * 8 * 32), "--routers",
          ",".join(methods), "--workdir", str(root), "--seq-len", "32",
          "--batch-size", "8", "--vocab-size", "512", "--eval-every", "10",
          "--probe-every", "5", "--test-fraction", "0.1", "--quiet"]
  for assignment in TINY_MODEL:
    argv += ["--set", assignment]
  return argv


def test_tune_then_compare_over_seeds_on_the_test_split(tmp_path, capsys):
  """The sweep chooses on validation only; the comparison at the choices reuses
  the sweep's runs, adds seeds, reads the test split, and a second invocation
  skips every finished run."""
  root = tmp_path / "tune"
  corpus = write_corpus(tmp_path / "corpus")
  choices_path = tune.main(tiny_args(corpus, root, METHODS)
                           + ["--inits", "normal", "--lrs", "1e-3,1e-2"])
  saved = json.loads(choices_path.read_text())
  # Every method trained at every point; each choice is its lowest valid PPL.
  assert [(e["method"], e["learning_rate"]) for e in saved["grid"]] == [
      ("dense", 1e-3), ("dense", 1e-2), ("switch", 1e-3), ("switch", 1e-2)]
  for method in METHODS:
    entries = [e for e in saved["grid"] if e["method"] == method]
    best = min(entries, key=lambda e: e["valid_ppl"][0])
    assert saved["choices"][method]["learning_rate"] == best["learning_rate"]
  assert "test" not in json.dumps(saved["choices"]) + json.dumps(saved["grid"])
  # The sweep never evaluated the test split.
  states = list(root.glob("*/*/seed_0/final_state.json"))
  assert len(states) == 4
  assert all("test" not in json.loads(p.read_text()) for p in states)
  assert "| **yes** |" in (root / "tuning.md").read_text()
  capsys.readouterr()

  argv = tiny_args(corpus, root, METHODS) + ["--choices", str(choices_path),
                                             "--seeds", "2"]
  start = time.perf_counter()
  report = compare_routers.main(argv)
  first_s = time.perf_counter() - start
  printed = capsys.readouterr().out
  runs = {(m, s): root / m / f"normal-lr{saved['choices'][m]['learning_rate']:g}"
          / f"seed_{s}" for m in METHODS for s in (0, 1)}
  for (method, seed), workdir in runs.items():
    outcome = "skipped" if seed == 0 else "trained"  # Seed 0: the sweep's run.
    assert f"== {method} seed {seed}: {outcome}" in printed, (method, seed)
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["seed"] == config["data"]["seed"] == seed
    state = json.loads((workdir / "final_state.json").read_text())
    assert state["test"]["ppl"] > 1  # Only now is the test split read.
  text = report.read_text()
  for method in METHODS:
    assert f"\n| {method} | 2 | " in text, method  # Two seeds per row.
  assert " ± " in text and "Judged on the test PPL" in text
  assert "chosen on the validation split" in text
  for png in ("ppl_vs_tokens", "fluctuation", "expert_load", "expert_by_domain"):
    assert (root / f"{png}.png").stat().st_size > 0, png
  metrics = {k: (w / "metrics.jsonl").read_bytes() for k, w in runs.items()}
  # Another seed: other batches and another init.
  first = {k: json.loads(v.splitlines()[0])["train/loss"] for k, v in metrics.items()}
  assert first["dense", 0] != first["dense", 1]

  start = time.perf_counter()
  compare_routers.main(argv)
  second_s = time.perf_counter() - start
  printed = capsys.readouterr().out
  assert all(f"== {m} seed {s}: skipped" in printed for m, s in runs), printed
  assert {k: (w / "metrics.jsonl").read_bytes() for k, w in runs.items()} == metrics
  assert second_s < first_s / 2, (first_s, second_s)


def test_translation_comparison_scores_bleu_and_judges_the_mt_orderings(
    tmp_path, capsys):
  """`--task translation` trains encoder-decoders on a parallel corpus, scores
  each run's test translations with sacrebleu once (cached), and the report
  judges the paper's BLEU orderings rather than its LM ones."""
  from tests.data.corpora import side_lines, write_pair  # pylint: disable=g-import-not-at-top
  src, tgt = write_pair(tmp_path / "pairs", *side_lines())
  root = tmp_path / "mt"
  argv = (tiny_args(str(src), root, METHODS)[2:]
          + ["--corpus", str(src), str(tgt), "--task", "translation",
             "--seq-len", "48", "--target-len", "40", "--beam", "1",
             "--test-sentences", "8", "--budget-tokens", str(10 * 8 * 88)])
  report = compare_routers.main(argv).read_text()
  assert "task: translation (model.arch=encdec, data.task=seq2seq)" in report
  assert "| method | test BLEU | test chrF |" in report
  assert "| switch > dense (test BLEU) | 29.7 > 28.31 |" in report
  assert "(test PPL)" not in report.split("orderings at this scale")[1]
  for method in METHODS:
    run = root / method / "fan_in-lr0.003" / "seed_0"
    scores = json.loads((run / "task_scores.json").read_text())
    assert scores["scores"]["sentences"] == 8
    assert 0 <= scores["scores"]["bleu"] <= 100
    assert len(list((run / "translate").glob("*-test-10.txt"))) == 1
  capsys.readouterr()
  compare_routers.main(argv)  # Finished and scored: nothing runs again.
  out = capsys.readouterr().out
  assert out.count(": skipped") == len(METHODS)
