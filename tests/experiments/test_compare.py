"""compare_routers on a tiny budget: a report row per method, the figures, and a
second invocation that skips the finished runs."""

import pathlib
import sysconfig
import time

from experiments import compare_routers

METHODS = ("dense", "switch", "stablemoe")
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


def test_compare_writes_report_and_skips_finished_runs(tmp_path, capsys):
  root = tmp_path / "compare"
  argv = ["--corpus", write_corpus(tmp_path / "corpus"), "--budget-tokens",
          str(20 * 8 * 32), "--routers", ",".join(METHODS), "--workdir", str(root),
          "--seq-len", "32", "--batch-size", "8", "--vocab-size", "512",
          "--eval-every", "10", "--probe-every", "5", "--quiet"]
  for assignment in TINY_MODEL:
    argv += ["--set", assignment]

  start = time.perf_counter()
  report = compare_routers.main(argv)
  first_s = time.perf_counter() - start

  printed = capsys.readouterr().out
  text = report.read_text()
  for method in METHODS:
    assert f"== {method}: trained" in printed, method
    assert f"\n| {method} | " in text, method
  for png in ("ppl_vs_tokens", "fluctuation", "expert_load", "expert_by_domain"):
    assert (root / f"{png}.png").stat().st_size > 0, png
  metrics = {m: (root / m / "metrics.jsonl").read_bytes() for m in METHODS}
  assert all(b'"eval/ppl"' in v for v in metrics.values())

  start = time.perf_counter()
  compare_routers.main(argv)
  second_s = time.perf_counter() - start

  printed = capsys.readouterr().out
  assert all(f"== {m}: skipped" in printed for m in METHODS), printed
  assert {m: (root / m / "metrics.jsonl").read_bytes() for m in METHODS} == metrics
  assert second_s < first_s / 2, (first_s, second_s)
