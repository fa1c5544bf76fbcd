"""Tune every method alike: one grid of FFN init x learning rate, chosen on validation.

  python experiments/tune.py --corpus '../shared/data/*.txt' --max-bytes 3000000 \
      --budget-tokens 786432 --eval-every 32 --probe-every 16 \
      --inits normal,fan_in,fan_in_depth --lrs 1e-3,3e-3,1e-2 \
      --workdir /tmp/tune
  python experiments/compare_routers.py ... --choices /tmp/tune/choices.json

The protocol (dense and MoE alike):
1. every method of `--routers` trains at every point of the same grid
   (`--inits` x `--lrs`), at seeds 0..N-1 (`--seeds`, default 1), on the same
   data, budget and model as `compare_routers.py`;
2. each method's choice is the point with the lowest mean final validation
   perplexity (ties: the first point in grid order); a run that diverges counts
   as infinite perplexity;
3. `<workdir>/choices.json` records the choices and the whole grid, and
   `<workdir>/tuning.md` shows it; `compare_routers.py --choices` then trains
   every method at its choice over seeds and reports the test split, which
   neither training nor this selection ever read: the sweep evaluates only on
   validation, and its runs never load test batches.

The workdir layout is `experiments.runs`'s, so a comparison pointed at the
sweep's workdir with the same budget reuses the finished runs of the chosen
points.
"""

import argparse
import json
import math
import pathlib
import shlex
import sys
import traceback
from collections.abc import Sequence

if __package__ in (None, ""):  # Run as a script: make the checkout importable.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import runs, stats  # noqa: E402
from experiments.final_state import final_state  # noqa: E402
from experiments.summary import median_step_seconds  # noqa: E402
from moejax.metrics.writers import read_metrics  # noqa: E402
from moejax.moe.ffn_init import FFN_INITS  # noqa: E402

CHOICES_FILE = "choices.json"
TUNING_FILE = "tuning.md"


def validation_record(workdir: pathlib.Path) -> dict:
  """What selection may read of a finished run: validation PPL and router
  diagnostics (never the test split)."""
  rows = read_metrics(workdir)
  evals = [r["eval/ppl"] for r in rows if "eval/ppl" in r]
  entropy = [r["router/entropy"] for r in rows if "router/entropy" in r]
  config = json.loads((workdir / "config.json").read_text())
  moe = config["model"]["moe"]
  drift = [v for v in final_state(workdir, test=False)["router_drift"].values()
           if v is not None]
  tokens = config["train"]["batch_size"] * config["data"]["seq_len"]
  return {
      "valid_ppl": float(evals[-1]) if evals else math.inf,
      "router_entropy": (float(entropy[-1]) / math.log(max(moe["num_experts"], 2))
                         if entropy and config["model"]["moe_layers"] else None),
      "router_drift": sum(drift) / len(drift) if drift else None,
      "step_s": median_step_seconds(rows, tokens),
  }


def select(grid: Sequence[dict]) -> dict[str, dict]:
  """Each method's grid entry with the lowest mean validation PPL over its seeds
  (the first such entry in grid order on a tie).

  Entries: {"method", "ffn_init", "learning_rate", "valid_ppl": [per seed]};
  nothing else of an entry is read.
  """
  best: dict[str, tuple[float, dict]] = {}
  for entry in grid:
    ppl = entry["valid_ppl"]
    mean = (math.inf if not ppl or not all(math.isfinite(v) for v in ppl)
            else sum(ppl) / len(ppl))
    method = entry["method"]
    if method not in best or mean < best[method][0]:
      best[method] = (mean, entry)
  return {m: {"ffn_init": e["ffn_init"], "learning_rate": e["learning_rate"],
              "valid_ppl_mean": mean}
          for m, (mean, e) in best.items()}


def write_tuning(root: pathlib.Path, grid: Sequence[dict], choices: dict,
                 protocol: dict, command: str) -> pathlib.Path:
  """`tuning.md`: the grid, each point's validation PPL and the choices."""
  head = ["method", "ffn_init", "learning rate", "valid PPL", "router entropy / log E",
          "router drift", "s/step", "chosen"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for e in grid:
    c = choices[e["method"]]
    chosen = (c["ffn_init"], c["learning_rate"]) == (e["ffn_init"],
                                                      e["learning_rate"])
    cells = [e["method"], e["ffn_init"], f"{e['learning_rate']:g}",
             stats.fmt(stats.spread(e["valid_ppl"])) + (
                 " (diverged)" if any(not math.isfinite(v) for v in e["valid_ppl"])
                 else ""),
             stats.fmt(stats.spread(e["router_entropy"]), ".3f"),
             stats.fmt(stats.spread(e["router_drift"]), ".3f"),
             stats.fmt(stats.spread(e["step_s"]), ".3f"),
             "**yes**" if chosen else ""]
    lines.append("| " + " | ".join(cells) + " |")
  text = (f"# Tuning sweep\n\nWritten by `experiments/tune.py`:\n\n```\n{command}\n"
          f"```\n\nProtocol: {json.dumps(protocol)}\n\nEvery method trains at every "
          "point of one grid; its choice is the point with the lowest mean final "
          "validation PPL over the seeds (mean ± std; one value: one seed). The "
          "test split is not read here.\n\n" + "\n".join(lines) + "\n")
  path = root / TUNING_FILE
  path.write_text(text)
  return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  runs.add_arguments(p)
  p.add_argument("--inits", default="normal,fan_in",
                 help=f"comma list of model.ffn_init from {', '.join(FFN_INITS)}")
  p.add_argument("--lrs", default="1e-3,3e-3,1e-2",
                 help="comma list of peak learning rates")
  p.add_argument("--seeds", type=int, default=1,
                 help="seeds 0..N-1 at every grid point")
  args = p.parse_args(argv)
  runs.check_arguments(p, args)
  args.inits = [s.strip() for s in args.inits.split(",") if s.strip()]
  bad = [s for s in args.inits if s not in FFN_INITS]
  if bad or not args.inits:
    p.error(f"unknown --inits {bad}; valid: {', '.join(FFN_INITS)}")
  try:
    args.lrs = [float(s) for s in args.lrs.split(",") if s.strip()]
  except ValueError:
    p.error(f"--lrs {args.lrs!r} is not a comma list of numbers")
  if not args.lrs or any(not lr > 0 for lr in args.lrs) or args.seeds < 1:
    p.error("--lrs must be positive numbers and --seeds >= 1")
  return args


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
  """Runs the sweep; returns the path of choices.json."""
  args = parse_args(argv)
  root = args.workdir
  points = [runs.Point(init, lr) for init in args.inits for lr in args.lrs]
  data_config = runs.build_config(args.routers[0], args, point=points[0])
  runs.prepare_data(root, data_config)
  grid = []
  for method in args.routers:
    for point in points:
      entry = {"method": method, "ffn_init": point.ffn_init,
               "learning_rate": point.learning_rate, "valid_ppl": [],
               "router_entropy": [], "router_drift": [], "step_s": []}
      for seed in range(args.seeds):
        config = runs.build_config(method, args, seed=seed, point=point)
        workdir = runs.run_dir(root, method, config)
        name = (f"{method} ffn_init={point.ffn_init} lr={point.learning_rate:g} "
                f"seed {seed}")
        print(f"== {name}: {workdir}", flush=True)
        try:
          outcome = runs.train_run(root, workdir, config, not args.quiet)
          record = validation_record(workdir)
        except Exception as e:  # pylint: disable=broad-except
          traceback.print_exc()  # A diverged point is a bad point, not a stop.
          outcome = f"failed ({type(e).__name__})"
          record = {"valid_ppl": math.inf, "router_entropy": None,
                    "router_drift": None, "step_s": None}
        print(f"== {name}: {outcome}, valid PPL {record['valid_ppl']:.2f}",
              flush=True)
        for key, value in record.items():
          entry[key].append(value)
      grid.append(entry)
  choices = select(grid)
  protocol = {"routers": args.routers, "inits": args.inits, "lrs": args.lrs,
              "seeds": args.seeds, "steps": args.steps,
              "batch_size": args.batch_size, "seq_len": args.seq_len,
              "corpus": data_config.data.source, "max_bytes": args.max_bytes,
              "test_fraction": args.test_fraction, "set": args.set}
  path = root / CHOICES_FILE
  path.write_text(json.dumps({"protocol": protocol, "choices": choices,
                              "grid": grid}, indent=1) + "\n")
  command = "python experiments/tune.py " + shlex.join(
      sys.argv[1:] if argv is None else list(argv))
  print(f"tuning: {write_tuning(root, grid, choices, protocol, command)}",
        flush=True)
  print(f"choices: {path}", flush=True)
  return path


if __name__ == "__main__":
  main()
