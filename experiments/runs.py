"""The runs of a comparison or a tuning sweep: their configs, workdirs and training.

Layout of a root workdir (shared by `compare_routers.py` and `tune.py`, so a
comparison pointed at its sweep's workdir reuses the runs the sweep finished):

  <root>/_data/                                  tokenizer and data cache, built once
  <root>/<method>/<ffn_init>-lr<lr>/seed_<s>/    one run (a moejax workdir)

Seed s sets `train.seed = data.seed = s`: every method sees the same batches in
the same order at seed s, and starts from the same params wherever the shapes
agree (params are drawn by path from the seed's init key).
"""

import argparse
import dataclasses
import glob
import json
import os
import pathlib
import shutil
import time
from collections.abc import Sequence

import ml_collections

from experiments.final_state import FINAL_STATE_FILE
from experiments.routing import ROUTES_FILE
from experiments.summary import WALL_TIME_FILE
from moejax.data import load_datasets
from moejax.metrics.writers import read_metrics
from moejax.train.config import RunConfig, parse
from moejax.train.loop import train_and_evaluate
from moejax.train.presets import METHODS, method_config

DATA_DIR = "_data"
# --task -> (model.arch, data.task): the decoder LM on next-token windows, the
# encoder-decoder on translation pairs, the encoder as a masked LM.
TASKS = {"lm": ("decoder", "lm"), "translation": ("encdec", "seq2seq"),
         "mlm": ("encoder", "mlm")}


@dataclasses.dataclass(frozen=True)
class Point:
  """One point of a sweep: the FFN init and peak learning rate (None: the
  preset's)."""

  ffn_init: str | None = None
  learning_rate: float | None = None


def corpus_source(corpus: Sequence[str], task: str = "lm") -> str:
  """`data.source` for files/globs (several arguments or comma lists), or
  `embedded`. Globs are expanded here so the report lists the files. The
  translation task takes two files, source side then target side
  (`parallel:`)."""
  patterns = [p.strip() for arg in corpus for p in arg.split(",") if p.strip()]
  if task == "translation":
    if len(patterns) != 2:
      raise SystemExit("--task translation needs --corpus <source side> <target "
                       f"side> (two line-aligned files), got {patterns}")
    return "parallel:" + ",".join(os.path.abspath(p) for p in patterns)
  if not patterns or patterns == ["embedded"]:
    return "embedded"
  files = []
  for pattern in patterns:
    matches = sorted(glob.glob(os.path.expanduser(pattern))) or [pattern]
    files += [f for f in map(os.path.abspath, matches) if f not in files]
  return "text:" + ",".join(files)


def add_arguments(p: argparse.ArgumentParser) -> None:
  """The arguments every comparison and sweep shares."""
  p.add_argument("--corpus", nargs="+", default=["embedded"],
                 help="text files or globs (one domain per file stem; several "
                 "arguments or a comma list), or 'embedded'")
  p.add_argument("--budget-tokens", type=int, required=True,
                 help="training tokens per run")
  p.add_argument("--task", choices=sorted(TASKS), default="lm",
                 help="lm: decoder LM; translation: encoder-decoder on two "
                 "line-aligned --corpus files; mlm: encoder masked LM")
  p.add_argument("--target-len", type=int, default=None,
                 help="translation: target tokens per row (default --seq-len)")
  p.add_argument("--routers", default=",".join(METHODS),
                 help=f"comma list of methods from {', '.join(METHODS)}")
  p.add_argument("--workdir", type=pathlib.Path, required=True)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--vocab-size", type=int, default=1024)
  p.add_argument("--max-bytes", type=int, default=None,
                 help="cap on corpus bytes (default: the library's)")
  p.add_argument("--test-fraction", type=float, default=0.05,
                 help="share of the corpus (of what validation leaves) held out "
                 "as a test split that training and selection never see (0: none)")
  p.add_argument("--eval-every", type=int, default=50)
  p.add_argument("--probe-every", type=int, default=20)
  p.add_argument("--set", action="append", default=[],
                 metavar="[METHOD:]SECTION.KEY=VALUE",
                 help="override a config key for every method (or one method), "
                 "e.g. model.d_model=64 or hash:model.router_options.balance="
                 "random (repeatable)")
  p.add_argument("--quiet", action="store_true", help="no per-step progress")


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Parses `--routers` into a list and derives `args.steps`."""
  args.routers = [m.strip() for m in args.routers.split(",") if m.strip()]
  unknown = [m for m in args.routers if m not in METHODS]
  if unknown or not args.routers:
    p.error(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
  args.row_tokens = args.seq_len + (
      (args.target_len or args.seq_len) if args.task == "translation" else 0)
  args.steps = args.budget_tokens // (args.batch_size * args.row_tokens)
  if args.steps < 1:
    p.error(f"--budget-tokens {args.budget_tokens} is less than one step "
            f"({args.batch_size} x {args.row_tokens} tokens)")


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


def build_config(method: str, args: argparse.Namespace, *, seed: int = 0,
                 point: Point = Point()) -> RunConfig:
  """The preset of `method` with the run's data, batch, schedule, seed and
  sweep point (applied after `--set`, so a tuned choice wins)."""
  steps = args.steps
  c = method_config(method, steps)
  c.model.arch, c.data.task = TASKS[args.task]
  c.data.source = corpus_source(args.corpus, args.task)
  c.data.seq_len = args.seq_len
  if args.task == "translation":
    # Both stacks take the preset's MoE placement; a verse longer than a row
    # is cut (EOS kept) rather than an error.
    c.data.target_len, c.data.overlong = args.target_len, "truncate"
  c.data.vocab_size = args.vocab_size
  c.data.test_fraction = args.test_fraction
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
  c.train.seed = c.data.seed = seed
  if point.ffn_init is not None:
    c.model.ffn_init = point.ffn_init
  if point.learning_rate is not None:
    c.optim.learning_rate = point.learning_rate
  return parse(c)


def run_dir(root: pathlib.Path, method: str, config: RunConfig) -> pathlib.Path:
  """`<root>/<method>/<ffn_init>-lr<lr>/seed_<s>`."""
  tag = f"{config.model.ffn_init}-lr{config.optim.learning_rate:g}"
  return root / method / tag / f"seed_{config.train.seed}"


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
  data = load_datasets(config.data, workdir=root / DATA_DIR,
                       batch_size=config.train.batch_size)
  print(data.describe(), flush=True)
  return data.domain_names


def train_run(root: pathlib.Path, workdir: pathlib.Path, config: RunConfig,
              verbose: bool) -> str:
  """Trains (or resumes) one run in `workdir`; returns 'trained' or 'skipped'."""
  saved = workdir / "config.json"
  if saved.exists():
    steps = json.loads(saved.read_text())["train"]["steps"]
    if steps != config.train.steps:  # Its schedule decays over other steps.
      raise SystemExit(f"{workdir} holds a run of {steps} steps, this one has "
                       f"{config.train.steps}; use another --workdir")
  if is_finished(workdir, config):
    return "skipped"
  workdir.mkdir(parents=True, exist_ok=True)
  if not (workdir / "tokenizer.model").exists():
    _link_tree(root / DATA_DIR, workdir)  # tokenizer.model and data/.
  for stale in (ROUTES_FILE, FINAL_STATE_FILE):  # Stale once training moves on.
    (workdir / stale).unlink(missing_ok=True)
  start = time.perf_counter()
  try:
    train_and_evaluate(config, workdir, verbose=verbose)
  finally:  # An interrupted run's time counts too: it resumes from there.
    wall = workdir / WALL_TIME_FILE
    before = json.loads(wall.read_text())["seconds"] if wall.exists() else 0.0
    wall.write_text(json.dumps(
        {"seconds": before + time.perf_counter() - start}) + "\n")
  return "trained"
