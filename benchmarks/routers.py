"""Training-step time of every routing method, against Switch and dense, one process.

Every method of `moejax.train.presets.METHODS` on its comparison preset (4
blocks, D=128, E=8 in blocks 1 and 3, batch 16 x 128 on the CPU sizes), through
the project's own `make_train_step` (AdamW, the router's aux losses). Methods
with phases are timed in each: stage methods per stage, EvoMoE's DTS gate in
its soft phase (temperature tau_max, every expert above the threshold) and its
hard phase (past `hard_step`: sampled top-1, timed on the one-slot program the
trainer compiles for it, `moejax.stages.plan.segments`), DSelect-k at
init (every expert active) and with binary selectors (codes saturated, <= k
experts per token), ReMoE at init and with its gates trained sparse (about
top_k experts per token).
The *sparse phase* of a method is the phase it spends most of training in at
its target sparsity; that row's `step/switch` is the figure the router-cost
target reads (every method <= 1.3x Switch, BASE <= 1.5x, on the CPU).

  python benchmarks/routers.py                  # CPU sizes (the presets)
  python benchmarks/routers.py --full           # accelerator sizes, bf16
  python benchmarks/routers.py --methods evomoe switch dense --iters 10

Every phase's step is compiled first (its first step) and trained a few steps
into its phase (`Phase.warm_up`); then the phases are timed round-robin,
`--iters` steps each split over `--rounds` passes, so a change in a shared
machine's load reaches every phase alike, every step from the phase's state
(on its own batch); the median step time is reported. `slots/token` is the mean
number of routed slots per token in the MoE layers at that state (the sparsity
the step should pay for); `rounds` is BASE's auction rounds.
"""

import argparse
import dataclasses
import platform
import statistics
import sys
import time
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax.models import TransformerLM
from moejax.train import config as train_config
from moejax.train import make_train_step
from moejax.stages.plan import segment_at, segments
from moejax.train.program import init_state
from moejax.train.optimizer import make_optimizer
from moejax.train.presets import METHODS, method_config


@dataclasses.dataclass(frozen=True)
class Phase:
  """One timed configuration of a method.

  Attributes:
    name: shown in the table.
    stage: index of the stage whose model is timed.
    stage_step: steps into that stage at the first timed step (schedules).
    sparse: whether this is the method's sparse phase (the target's row).
    prepare: params -> params applied after init (e.g. saturated codes).
    dropless: run the MoE layers on the dropless path (`model.matmul=auto`),
      the path of the methods with a variable number of experts per token:
      Switch on it is their like-for-like reference.
    warm_up: (step, state, batches) -> state, training run after compilation
      to reach the phase (ReMoE's gates trained sparse); default
      `train_steps` (a few plain steps, so the router has left its init).
  """

  name: str
  stage: int = 0
  stage_step: int = 0
  sparse: bool = True
  prepare: Callable[[dict], dict] | None = None
  dropless: bool = False
  warm_up: Callable | None = None


def saturate_dselect_codes(params: dict) -> dict:
  """DSelect-k's code layers scaled so every smooth step is exactly 0 or 1.

  The kernel times 1e4 and the bias pushed to +-gamma (gamma = 1) put |z| far
  past gamma/2 for all but a vanishing share of tokens: each selector names one
  expert, as after the entropy regulariser has converged.
  """

  def fix(path, leaf):
    names = [getattr(k, "key", "") for k in path]
    if "router" in names and "code" in names:
      if names[-1] == "kernel":
        return leaf * 1e4
      return jnp.where(leaf >= 0, 1.0, -1.0).astype(leaf.dtype)
    return leaf

  return jax.tree_util.tree_map_with_path(fix, params)


def train_steps(step, state, batches, steps: int = 8):
  """`steps` plain training steps: timed phases start from a router that has
  trained a little (Switch's first steps drop a third of its slots)."""
  for batch in batches[:steps]:
    state, _ = step(state, batch)
  return state


def train_remoe_gates_sparse(step, state, batches, most: float = 1.25,
                             max_steps: int = 40):
  """ReMoE's gates trained until a token opens at most `most` experts on
  average (target 1 = top_k): its L1 coefficient starts at 1e-3 (the preset's
  1e-8 takes ~80 steps of x1.2 to matter) and the train step runs until the
  experts per token (mean over MoE layers) fall to `most`.

  On the benchmark's random tokens the L1 keeps closing gates (about 10 steps
  from 4 experts per token to 1, 5 more to none), so the phase is timed at the
  first state whose step opened at most `most` (every timed step starts from
  the phase's state, `Timed.time`).
  """
  def set_coef(path, leaf):
    return jnp.full_like(leaf, 1e-3) if "l1_coef" in jax.tree_util.keystr(
        path) else leaf

  state = state.replace(model_state=jax.tree_util.tree_map_with_path(
      set_coef, state.model_state))
  for batch in batches[:max_steps]:
    before = jax.tree.map(jnp.copy, state)  # The step donates its state.
    state, metrics = step(state, batch)
    if float(metrics["router/experts_per_token"]) <= most:
      return before  # The state whose gates opened <= `most` on this batch.
  raise RuntimeError(f"ReMoE's gates did not reach {most} experts per token "
                     f"in {max_steps} steps")


def phases(method: str, run: train_config.RunConfig) -> list[Phase]:
  """The phases of `method` worth timing, its sparse phase marked."""
  if method == "dselect_k":
    return [Phase("dense codes (init)", sparse=False),
            Phase("binary codes", prepare=saturate_dselect_codes)]
  if method == "evomoe":
    options = dict(run.stages[1].model.moe.router_options)
    return [Phase("dense stage", stage=0, sparse=False),
            Phase("soft (tau_max)", stage=1, sparse=False),
            Phase("hard (sampled top-1)", stage=1,
                  stage_step=options["hard_step"])]
  if method == "stablemoe":
    return [Phase("stage 1 (distill)", stage=0, sparse=False),
            Phase("stage 2 (frozen)", stage=1)]
  if method == "upcycle":
    return [Phase("dense stage", stage=0, sparse=False),
            Phase("upcycled", stage=1)]
  if method == "remoe":
    # ReLU gates of an untrained router open about half the experts; the
    # target sparsity comes from training.
    return [Phase("dense start (init)", sparse=False),
            Phase("gates trained sparse", warm_up=train_remoe_gates_sparse)]
  if method == "switch":
    return [Phase("train"), Phase("train, dropless", sparse=False, dropless=True)]
  return [Phase("train")]


def _config(method: str, args) -> train_config.RunConfig:
  c = method_config(method)
  c.train.batch_size = args.batch
  c.data.seq_len = args.seq_len
  c.data.vocab_size = args.vocab
  for key in ("num_layers", "d_model", "num_heads", "d_ff", "num_experts",
              "dtype"):
    value = getattr(args, key)
    if value is not None:
      c.model[key] = value
  if method == "topk":
    c.model.expert_d_ff = c.model.d_ff // c.model.top_k
  return train_config.parse(c)


def _slots_per_token(metrics: dict) -> float:
  """Mean routed slots per token over MoE layers, from the step's load metrics."""
  for key in ("router/experts_per_token", "router/active_experts",
              "router/slots_per_token"):
    if key in metrics:
      return float(metrics[key])
  return float("nan")


def random_batches(run: train_config.RunConfig, count: int, seed: int
                   ) -> list[dict]:
  """`count` batches of uniformly random tokens (the timed ones and the
  warm-up ones are drawn with different seeds)."""
  shape = (count, run.train.batch_size, run.data.seq_len + 1)
  tokens = np.asarray(jax.random.randint(jax.random.key(seed), shape, 0,
                                         run.data.vocab_size, jnp.int32))
  return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens]


class Timed:
  """One phase's compiled step, its state and batches, and the times taken."""

  def __init__(self, run: train_config.RunConfig, phase: Phase, iters: int):
    stage = run.stages[phase.stage]
    # The model the trainer compiles for this segment of the stage (the DTS
    # gate's hard phase: one slot per token).
    model_config = segment_at(segments(stage), phase.stage_step)
    if phase.dropless:
      model_config = dataclasses.replace(model_config, moe=dataclasses.replace(
          model_config.moe, dispatch="dropless", matmul="auto"))
    model = TransformerLM(model_config)
    tx = make_optimizer(run.optim, run.train.steps, stage.frozen)
    state = jax.jit(init_state, static_argnums=(0, 1, 3))(
        model, tx, jax.random.key(0), run.data.seq_len)
    if phase.prepare is not None:
      params = phase.prepare(state.params)
      state = state.replace(params=params, opt_state=tx.init(params))
    # The stage step is state.step - stage_start: start at phase.stage_step.
    self.step = jax.jit(make_train_step(model, tx, jax.random.key(1),
                                        stage_start=-phase.stage_step),
                        donate_argnums=0)
    self.batches = random_batches(run, max(iters, 1) + 1, seed=2)
    start = time.perf_counter()
    self.state, metrics = self.step(state, self.batches[0])  # Compiles.
    jax.block_until_ready(metrics)
    self.compile_s = time.perf_counter() - start
    self.state = (phase.warm_up or train_steps)(
        self.step, self.state, random_batches(run, 40, seed=3))
    self.times: list[float] = []
    self.metrics = metrics

  def time(self, iters: int) -> None:
    """Runs `iters` steps (after the compile step), recording each one's time.

    Every step starts from the phase's state (a copy taken off the clock: the
    step donates it), so all timed steps see the sparsity the phase was set up
    with; the batches differ.
    """
    for batch in self.batches[1:iters + 1]:
      state = jax.tree.map(jnp.copy, self.state)
      jax.block_until_ready(state)
      start = time.perf_counter()
      _, self.metrics = self.step(state, batch)
      jax.block_until_ready(self.metrics)
      self.times.append(time.perf_counter() - start)

  def result(self) -> dict:
    metrics = jax.device_get(self.metrics)
    loss = float(metrics["train/loss"])
    if not np.isfinite(loss):
      raise FloatingPointError(f"loss {loss}")
    get = lambda k: float(metrics.get(k, float("nan")))  # noqa: E731
    return dict(seconds=statistics.median(self.times), compile_s=self.compile_s,
                slots=_slots_per_token(metrics), rounds=get("router/auction_rounds"),
                drop=get("router/drop_frac"))


def versions() -> str:
  dev = jax.devices()[0]
  return (f"device: {dev.device_kind} ({jax.default_backend()}, "
          f"{jax.device_count()} device(s)); python {platform.python_version()}, "
          f"jax {jax.__version__}, flax {flax.__version__}, "
          f"optax {optax.__version__}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--full", action="store_true",
                      help="accelerator sizes: 8 blocks, D=512, F=2048, E=16, "
                           "batch 32 x 512, V=32768, bfloat16")
  parser.add_argument("--methods", nargs="+", default=list(METHODS),
                      choices=METHODS)
  parser.add_argument("--iters", type=int, default=6,
                      help="timed steps per phase, split over --rounds")
  parser.add_argument("--rounds", type=int, default=3,
                      help="round-robin passes over all phases")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--vocab", type=int, default=1024)
  parser.add_argument("--num-layers", type=int, default=None)
  parser.add_argument("--d-model", type=int, default=None)
  parser.add_argument("--num-heads", type=int, default=None)
  parser.add_argument("--d-ff", type=int, default=None)
  parser.add_argument("--num-experts", type=int, default=None)
  parser.add_argument("--dtype", default=None)
  args = parser.parse_args()
  if args.full:
    args.num_layers, args.d_model, args.num_heads, args.d_ff = 8, 512, 8, 2048
    args.num_experts, args.batch, args.seq_len = 16, 32, 512
    args.vocab, args.dtype = 32768, "bfloat16"
  methods = list(dict.fromkeys(["switch", "dense"] + list(args.methods)))
  print(f"# {versions()}")
  timed = []
  for method in methods:
    run = _config(method, args)
    for phase in phases(method, run):
      print(f"# compiling {method}: {phase.name}", file=sys.stderr, flush=True)
      timed.append((method, phase, Timed(run, phase, args.iters)))
  # Round-robin: a change in the machine's load hits every phase alike.
  per_round = max(1, args.iters // args.rounds)
  for r in range(args.rounds):
    print(f"# round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    for _, _, t in timed:
      t.time(per_round)
  rows = [dict(method=m, phase=p, **t.result()) for m, p, t in timed]
  switch_s = next(r["seconds"] for r in rows if r["method"] == "switch")
  dense_s = next(r["seconds"] for r in rows if r["method"] == "dense")
  m = run.stages[-1].model
  print(f"# {m.num_layers} blocks, D={m.d_model}, F={m.d_ff}, E={m.moe.num_experts}, "
        f"batch {args.batch} x {args.seq_len}, V={args.vocab}, {m.dtype}; median "
        f"of {args.iters} steps after compilation")
  print("| method | phase | sparse phase | step ms | step / switch | step / dense "
        "| slots/token | rounds | drop | compile s |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    if r["method"] not in args.methods:
      continue
    fmt = lambda v, f: "-" if np.isnan(v) else format(v, f)  # noqa: E731
    print(f"| {r['method']} | {r['phase'].name} | "
          f"{'yes' if r['phase'].sparse else ''} | {r['seconds'] * 1e3:.1f} | "
          f"{r['seconds'] / switch_s:.2f} | {r['seconds'] / dense_s:.2f} | "
          f"{fmt(r['slots'], '.2f')} | {fmt(r['rounds'], '.0f')} | "
          f"{fmt(r['drop'], '.3f')} | {r['compile_s']:.1f} |")


if __name__ == "__main__":
  main()
