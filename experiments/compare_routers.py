"""Train routing methods at equal active FLOPs on one corpus and compare them.

  python experiments/compare_routers.py --corpus '../shared/data/*.txt' \
      --max-bytes 3000000 --budget-tokens 786432 --eval-every 32 \
      --probe-every 16 --workdir /tmp/compare-three-domains

Every method is `moejax.train.presets.method_config(method, steps)`: one model (4
blocks, D=128, MoE in blocks 1 and 3, 8 experts) with the dense model's active
FFN FLOPs per token (DSelect-k and EvoMoE's soft phase use several experts per
token, as in their papers), the same data config, seed and batch size, so every
method sees the same batches in the same order; steps = budget // (batch_size *
seq_len). Several corpus files (or globs) make a multi-domain corpus, one domain
per file stem (`data.source = "text:a.txt,b.txt"`); with no --corpus the
embedded corpus (Python sources and docs, two domains) is used.

Layout: `<workdir>/_data/` prepares the data and trains the tokenizer once; each
method trains in `<workdir>/<method>/` on a copy (hard links) of that tokenizer
and data cache. A method whose run is finished (last checkpoint and last
evaluation at its final step) is not trained again; an unfinished one resumes
from its last checkpoint. `<workdir>/report.md` and its PNGs are rewritten on
every invocation (see `experiments/report.py`).
"""

import argparse
import glob
import json
import os
import pathlib
import platform
import shlex
import shutil
import sys
import time
import traceback
from collections.abc import Sequence

if __package__ in (None, ""):  # Run as a script: make the checkout importable.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import ml_collections  # noqa: E402

from experiments import report  # noqa: E402
from experiments.routing import ROUTES_FILE  # noqa: E402
from experiments.summary import WALL_TIME_FILE, read_run  # noqa: E402
from moejax.metrics.writers import read_metrics  # noqa: E402
from moejax.train.config import RunConfig, parse  # noqa: E402
from moejax.train.loop import train_and_evaluate  # noqa: E402
from moejax.train.presets import METHODS, method_config  # noqa: E402

DATA_DIR = "_data"


def corpus_source(corpus: Sequence[str]) -> str:
  """`data.source` for files/globs (several arguments or comma lists), or
  `embedded`. Globs are expanded here so the report lists the files."""
  patterns = [p.strip() for arg in corpus for p in arg.split(",") if p.strip()]
  if not patterns or patterns == ["embedded"]:
    return "embedded"
  files = []
  for pattern in patterns:
    matches = sorted(glob.glob(os.path.expanduser(pattern))) or [pattern]
    files += [f for f in map(os.path.abspath, matches) if f not in files]
  return "text:" + ",".join(files)


def _override(c: ml_collections.ConfigDict, method: str, assignment: str) -> None:
  """Applies `[method:]dotted.key=value` (value parsed as JSON, else a string);
  with a `method:` prefix only to that method."""
  scope, colon, rest = assignment.partition(":")
  if colon and scope in METHODS:
    if scope != method:
      return
    assignment = rest
  key, sep, raw = assignment.partition("=")
  if not sep or "." not in key:
    raise SystemExit(f"--set {assignment!r}: use [method:]section.key=value, e.g. "
                     "model.d_model=64")
  try:
    value = json.loads(raw)
  except json.JSONDecodeError:
    value = raw
  *parents, name = key.split(".")
  for part in parents:
    c = c[part]
  c[name] = value


def build_config(method: str, args: argparse.Namespace, source: str,
                 steps: int) -> RunConfig:
  """The preset of `method` with the comparison's data, batch and schedule."""
  c = method_config(method, steps)
  c.data.source = source
  c.data.seq_len = args.seq_len
  c.data.vocab_size = args.vocab_size
  if args.max_bytes:
    c.data.max_bytes = args.max_bytes
  c.train.batch_size = args.batch_size
  c.train.eval_every = args.eval_every
  c.train.probe_every = args.probe_every
  # Router health is logged at least as often as the routing is probed.
  c.train.log_every = min(c.train.log_every, args.probe_every)
  c.train.checkpoint_every = min(c.train.checkpoint_every, steps)
  for assignment in args.set:
    _override(c, method, assignment)
  return parse(c)


def is_finished(workdir: pathlib.Path, config: RunConfig) -> bool:
  """True when the run has its final checkpoint and its final evaluation."""
  steps = config.train.steps
  last_stage = workdir / "checkpoints" / f"stage_{len(config.stages) - 1}"
  if not (last_stage / str(steps)).is_dir() or not (workdir / "metrics.jsonl").exists():
    return False
  return any(r["step"] == steps and "eval/ppl" in r for r in read_metrics(workdir))


def _link_tree(src: pathlib.Path, dst: pathlib.Path) -> None:
  """Hard-links (or copies) the files under `src` into `dst`, keeping any file
  already there."""
  for path in src.rglob("*"):
    target = dst / path.relative_to(src)
    if path.is_dir() or target.exists():
      continue
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
      os.link(path, target)
    except OSError:  # Another filesystem: copy.
      shutil.copy2(path, target)


def prepare_data(root: pathlib.Path, config: RunConfig) -> tuple[str, ...]:
  """Trains the shared tokenizer and builds the data cache once; returns the
  domain names."""
  from moejax.data import load_datasets  # pylint: disable=g-import-not-at-top
  data = load_datasets(config.data, workdir=root / DATA_DIR,
                       batch_size=config.train.batch_size)
  print(data.describe(), flush=True)
  return data.domain_names


def train_method(root: pathlib.Path, method: str, config: RunConfig,
                 verbose: bool) -> str:
  """Trains (or resumes) one method; returns 'trained' or 'skipped'."""
  workdir = root / method
  if is_finished(workdir, config):
    return "skipped"
  workdir.mkdir(parents=True, exist_ok=True)
  shared = root / DATA_DIR
  if not (workdir / "tokenizer.model").exists():
    _link_tree(shared, workdir)  # tokenizer.model and data/.
  (workdir / ROUTES_FILE).unlink(missing_ok=True)  # Stale once training moves on.
  start = time.perf_counter()
  try:
    train_and_evaluate(config, workdir, verbose=verbose)
  finally:  # An interrupted run's time counts too: it resumes from there.
    wall = workdir / WALL_TIME_FILE
    before = json.loads(wall.read_text())["seconds"] if wall.exists() else 0.0
    wall.write_text(json.dumps(
        {"seconds": before + time.perf_counter() - start}) + "\n")
  return "trained"


def _setup_lines(args, source: str, steps: int, domains: Sequence[str],
                 config: RunConfig, outcomes: dict[str, str]) -> list[str]:
  files = source[5:].split(",") if source.startswith("text:") else ["embedded"]
  m = config.model
  tokens = steps * args.batch_size * args.seq_len
  cap = config.data.max_bytes
  return [
      f"corpus: {', '.join(os.path.basename(f) for f in files)}; domains: "
      f"{', '.join(domains)}; "
      + (f"data.max_bytes {cap:,} (split evenly across domains)" if cap else
         "no byte cap")
      + f"; SentencePiece vocabulary {config.data.vocab_size}, trained once and "
      "shared by every method",
      f"budget: {tokens:,} tokens = {steps} steps x {args.batch_size} sequences x "
      f"{args.seq_len} tokens (asked: {args.budget_tokens:,}); evaluation every "
      f"{args.eval_every} steps on {config.data.eval_batches} held-out batches; "
      f"routing probes every {args.probe_every} steps",
      f"model: {m.num_layers} blocks, D={m.d_model}, F={m.d_ff}, MoE blocks "
      f"{list(m.moe_layers)}, {m.moe.num_experts} experts "
      "(`moejax.train.presets.method_config`)"
      + (f"; overrides: {', '.join(args.set)}" if args.set else ""),
      f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
      f"{jax.devices()[0].platform} x {jax.device_count()}, jax {jax.__version__}",
  ] + [f"**{method} {outcome}**: left out of the results"
        for method, outcome in outcomes.items() if outcome.startswith("failed")]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--corpus", nargs="+", default=["embedded"],
                 help="text files or globs (one domain per file stem; several "
                 "arguments or a comma list), or 'embedded'")
  p.add_argument("--budget-tokens", type=int, required=True,
                 help="training tokens per method")
  p.add_argument("--routers", default=",".join(METHODS),
                 help=f"comma list of methods from {', '.join(METHODS)}")
  p.add_argument("--workdir", type=pathlib.Path, required=True)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--vocab-size", type=int, default=1024)
  p.add_argument("--max-bytes", type=int, default=None,
                 help="cap on corpus bytes (default: the library's)")
  p.add_argument("--target-ppl", type=float, default=None,
                 help="PPL for 'tokens to reach' (default: dense's final PPL)")
  p.add_argument("--eval-every", type=int, default=50)
  p.add_argument("--probe-every", type=int, default=20)
  p.add_argument("--set", action="append", default=[],
                 metavar="[METHOD:]SECTION.KEY=VALUE",
                 help="override a config key for every method (or one method), "
                 "e.g. model.d_model=64 or hash:model.router_options.balance="
                 "random (repeatable)")
  p.add_argument("--quiet", action="store_true", help="no per-step progress")
  args = p.parse_args(argv)
  args.routers = [m.strip() for m in args.routers.split(",") if m.strip()]
  unknown = [m for m in args.routers if m not in METHODS]
  if unknown or not args.routers:
    p.error(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
  return args


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
  """Runs the comparison; returns the path of report.md."""
  args = parse_args(argv)
  steps = args.budget_tokens // (args.batch_size * args.seq_len)
  if steps < 1:
    raise SystemExit(f"--budget-tokens {args.budget_tokens} is less than one step "
                     f"({args.batch_size} x {args.seq_len} tokens)")
  root = args.workdir
  source = corpus_source(args.corpus)
  configs = {m: build_config(m, args, source, steps) for m in args.routers}
  domains = prepare_data(root, next(iter(configs.values())))
  outcomes = {}
  for method, config in configs.items():
    print(f"== {method}: {steps} steps", flush=True)
    try:
      outcomes[method] = train_method(root, method, config, not args.quiet)
    except Exception as e:  # pylint: disable=broad-except
      # One method's failure leaves it out of the report, not the others.
      traceback.print_exc()
      first = (str(e).strip().splitlines() or [""])[0][:200]
      outcomes[method] = f"failed ({type(e).__name__}: {first})"
    print(f"== {method}: {outcomes[method]}", flush=True)
  runs = [read_run(root / m, m) for m, o in outcomes.items()
          if not o.startswith("failed")]
  moe_config = next((c for c in configs.values() if c.model.moe_layers),
                    configs[args.routers[0]])
  command = "python experiments/compare_routers.py " + shlex.join(
      sys.argv[1:] if argv is None else list(argv))
  path = report.write_report(
      root, runs, target_ppl=args.target_ppl, command=command,
      setup=_setup_lines(args, source, steps, domains, moe_config, outcomes))
  print(f"report: {path}", flush=True)
  failed = [m for m, o in outcomes.items() if o.startswith("failed")]
  if failed:
    raise SystemExit(f"failed: {', '.join(failed)} (see above); the report "
                     "leaves them out")
  return path


if __name__ == "__main__":
  main()
