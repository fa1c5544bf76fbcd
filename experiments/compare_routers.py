"""Train routing methods at equal active FLOPs over seeds and compare them.

  python experiments/compare_routers.py --corpus '../shared/data/*.txt' \
      --max-bytes 3000000 --budget-tokens 786432 --eval-every 32 \
      --probe-every 16 --seeds 3 --choices /tmp/tune/choices.json \
      --workdir /tmp/compare-three-domains

Every method of `moejax.train.presets.METHODS` (or `--routers`) is
`method_config(method, steps)`: one model (4 blocks, D=128, MoE in blocks 1 and
3, 8 experts) whose FFNs all start from one initializer (`model.ffn_init`) and
whose active FFN FLOPs per token equal the dense model's (`model.equal_flops`;
DSelect-k and EvoMoE's soft phase use several experts per token, as in their
papers), with the same data config and batch size; steps = budget //
(batch_size * seq_len). `--seeds N` trains every method at seeds 0..N-1 (seed s:
the same batches in the same order for every method, and the same init wherever
the shapes agree; `experiments.runs`). `--choices` applies each method's FFN init
and learning rate chosen by `experiments/tune.py` on the validation split; the
report then judges the papers' orderings on the test split, which neither
training nor that selection saw. Several corpus files (or globs) make a
multi-domain corpus, one domain per file stem; with no --corpus the embedded
corpus (Python sources and docs, two domains) is used.

A finished run (last checkpoint and last evaluation at its final step) is not
trained again; an unfinished one resumes from its last checkpoint (layout:
`experiments.runs`). `<workdir>/report.md` and its PNGs are rewritten on every
invocation (see `experiments/report.py`).
"""

import argparse
import json
import os
import pathlib
import platform
import shlex
import sys
import traceback
from collections.abc import Sequence

if __package__ in (None, ""):  # Run as a script: make the checkout importable.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from experiments import report, runs, task_scores  # noqa: E402
from experiments.summary import read_run  # noqa: E402
from moejax.train.config import RunConfig  # noqa: E402


def load_choices(path: pathlib.Path | None, methods: Sequence[str]
                 ) -> dict[str, runs.Point]:
  """Each method's tuned point from `tune.py`'s choices file ({} without one)."""
  if path is None:
    return {}
  chosen = json.loads(path.read_text())["choices"]
  missing = [m for m in methods if m not in chosen]
  if missing:
    raise SystemExit(f"--choices {path} has no choice for {', '.join(missing)}; "
                     "tune them too or leave them out of --routers")
  return {m: runs.Point(chosen[m]["ffn_init"], chosen[m]["learning_rate"])
          for m in methods}


def _setup_lines(args, domains: Sequence[str], config: RunConfig,
                 outcomes: dict[str, str]) -> list[str]:
  source = config.data.source
  kind, _, rest = source.partition(":")
  files = rest.split(",") if kind in ("text", "parallel") else ["embedded"]
  m = config.model
  tokens = args.steps * args.batch_size * args.row_tokens
  cap = config.data.max_bytes
  return [
      f"corpus: {', '.join(os.path.basename(f) for f in files)}; domains: "
      f"{', '.join(domains)}; "
      + ("every pair (no byte cap)" if config.data.task == "seq2seq" else
         f"data.max_bytes {cap:,} (split evenly across domains)" if cap else
         "no byte cap")
      + f"; SentencePiece vocabulary {config.data.vocab_size}, trained once on "
      "the training split and shared by every run",
      f"held out: validation {config.data.eval_fraction:.0%} of the corpus, test "
      f"{config.data.test_fraction:.0%} of the rest (`data.test_fraction`); each "
      f"evaluation reads {config.data.eval_batches} batches",
      f"task: {args.task} (model.arch={m.arch}, data.task={config.data.task})"
      + (f"; rows of {config.data.seq_len} source + {config.data.target_len or config.data.seq_len}"
         " target tokens" if config.data.task == "seq2seq" else ""),
      f"budget: {tokens:,} tokens = {args.steps} steps x {args.batch_size} "
      f"sequences x {args.row_tokens} tokens (asked: {args.budget_tokens:,}); "
      f"evaluation every {args.eval_every} steps; routing probes every "
      f"{args.probe_every} steps; seeds {list(range(args.seeds))}",
      f"model: {m.num_layers} blocks"
      + (f" (decoder; encoder {m.encoder_depth}, MoE blocks "
         f"{list(m.encoder_moe_layers)})" if m.arch == "encdec" else "")
      + f", D={m.d_model}, F={m.d_ff}, MoE blocks "
      f"{list(m.moe_layers)}, {m.moe.num_experts} experts "
      "(`moejax.train.presets.method_config`)"
      + (f"; overrides: {', '.join(args.set)}" if args.set else ""),
      f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
      f"{jax.devices()[0].platform} x {jax.device_count()}, jax {jax.__version__}",
  ] + [f"**{run} {outcome}**: left out of the results"
       for run, outcome in outcomes.items() if outcome.startswith("failed")]


def _tuning_section(path: pathlib.Path | None,
                    configs: dict[tuple[str, int], RunConfig]) -> str:
  points = sorted({(m, c.model.ffn_init, c.optim.learning_rate)
                   for (m, _), c in configs.items()})
  lines = ["| method | ffn_init | learning rate |", "|---|---|---|"]
  lines += [f"| {m} | {init} | {lr:g} |" for m, init, lr in points]
  where = (f"chosen on the validation split by `experiments/tune.py` "
           f"(`{path}`; its `tuning.md` has the grid)" if path else
           "the presets' defaults (not tuned)")
  return f"\nEach method's FFN init and learning rate, {where}:\n\n" + "\n".join(
      lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  runs.add_arguments(p)
  p.add_argument("--seeds", type=int, default=1,
                 help="train every method at seeds 0..N-1")
  p.add_argument("--choices", type=pathlib.Path, default=None,
                 help="choices.json of experiments/tune.py: each method's FFN "
                 "init and learning rate")
  p.add_argument("--beam", type=int, default=4,
                 help="translation: beam size of the test translations")
  p.add_argument("--test-sentences", type=int, default=None,
                 help="translation: the first N test pairs (default: all)")
  p.add_argument("--finetune-steps", type=int, default=300,
                 help="mlm: steps of the domain classifier fine-tuned on each "
                 "run's encoder")
  p.add_argument("--target-ppl", type=float, default=None,
                 help="valid PPL for 'tokens to reach' (default: dense's final)")
  args = p.parse_args(argv)
  runs.check_arguments(p, args)
  if args.seeds < 1:
    p.error("--seeds must be >= 1")
  return args


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
  """Runs the comparison; returns the path of report.md."""
  args = parse_args(argv)
  root = args.workdir
  chosen = load_choices(args.choices, args.routers)
  configs = {(m, s): runs.build_config(m, args, seed=s,
                                       point=chosen.get(m, runs.Point()))
             for s in range(args.seeds) for m in args.routers}
  domains = runs.prepare_data(root, next(iter(configs.values())))

  outcomes, done = {}, []
  for (method, seed), config in configs.items():
    workdir = runs.run_dir(root, method, config)
    name = f"{method} seed {seed}"
    print(f"== {name}: {config.train.steps} steps in {workdir}", flush=True)
    try:
      outcomes[name] = runs.train_run(root, workdir, config, not args.quiet)
      done.append((method, workdir))
    except Exception as e:  # pylint: disable=broad-except
      # One run's failure leaves it out of the report, not the others.
      traceback.print_exc()
      first = (str(e).strip().splitlines() or [""])[0][:200]
      outcomes[name] = f"failed ({type(e).__name__}: {first})"
    print(f"== {name}: {outcomes[name]}", flush=True)
  options = task_scores.ScoreOptions(beam_size=args.beam,
                                     max_sentences=args.test_sentences,
                                     finetune_steps=args.finetune_steps)
  for method, workdir in done:  # Translation BLEU, fine-tuned accuracy.
    scores = task_scores.score_run(workdir, options)
    if scores:
      print(f"== {method} {workdir.name}: {scores}", flush=True)
  summaries = [read_run(w, m, test=True) for m, w in done]
  moe_config = next((c for c in configs.values() if c.model.has_moe),
                    next(iter(configs.values())))
  command = "python experiments/compare_routers.py " + shlex.join(
      sys.argv[1:] if argv is None else list(argv))
  path = report.write_report(
      root, summaries, target_ppl=args.target_ppl, command=command,
      setup=_setup_lines(args, domains, moe_config, outcomes),
      tuning=_tuning_section(args.choices, configs))
  print(f"report: {path}", flush=True)
  failed = [m for m, o in outcomes.items() if o.startswith("failed")]
  if failed:
    raise SystemExit(f"failed: {', '.join(failed)} (see above); the report "
                     "leaves them out")
  return path


if __name__ == "__main__":
  main()
