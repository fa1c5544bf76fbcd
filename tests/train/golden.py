"""The golden run: every preset of `moejax.train.presets.METHODS`, shrunk to a
tiny model, trained a few steps; its logged metrics are the reference that
`tests/train/test_golden.py` asserts.

Regenerate (only when a change of the numbers is intended, and say why in the
commit):

  PYTHONPATH=. python -m tests.train.golden            # every preset
  PYTHONPATH=. python -m tests.train.golden evomoe     # one preset

It writes `tests/train/golden.json`.
"""

import json
import pathlib
import shutil
import sys
import tempfile

# Imported first: the tests' 8 simulated CPU devices (conftest.py), also when
# run as a script.
from tests.conftest import tiny_sizes  # noqa: I001

from moejax.metrics.writers import read_metrics  # noqa: E402
from moejax.train import parse, train_and_evaluate  # noqa: E402
from moejax.train.presets import METHODS, method_config  # noqa: E402

GOLDEN_FILE = pathlib.Path(__file__).with_name("golden.json")
# 10 steps: each preset's phases and stages occur (StableMoE distills 2 steps,
# EvoMoE's dense stage is 2 steps and its DTS gate turns hard at step 6,
# upcycling starts at step 5).
STEPS = 10
# Recorded: the losses, and the router's metrics of every MoE layer.
PREFIXES = ("train/loss", "train/aux_loss", "train/total_loss", "router/",
            "eval/loss")


def golden_config(method: str):
  """`method`'s preset at a tiny size: 2 blocks (MoE in block 1), D = 32,
  F = 64, sequences of 32 tokens, batch 8, one device, a metrics row every
  step."""
  c = tiny_sizes(method_config(method, steps=STEPS))
  c.data.eval_batches = 1
  c.train.batch_size = 8
  c.train.log_every = 1
  c.train.eval_every = STEPS
  c.train.checkpoint_every = STEPS
  c.train.probe_every = 0
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 2
  # One device: the plain layer (the expert-parallel path has its own tests
  # against it, and an 8-device program compiles several times slower).
  c.mesh.data = 1
  return c


def golden_metrics(method: str, workdir: pathlib.Path) -> dict[str, list]:
  """{metric: [value per logged step]} of `method`'s golden run in `workdir`."""
  train_and_evaluate(parse(golden_config(method)), workdir, verbose=False)
  rows = read_metrics(workdir)
  keys = sorted({k for r in rows for k in r if k.startswith(PREFIXES)})
  return {"step": [r["step"] for r in rows if "train/loss" in r],
          **{k: [r[k] for r in rows if k in r] for k in keys}}


def prepare(path: pathlib.Path) -> pathlib.Path:
  """A workdir holding only the golden runs' tokenizer (shared by all)."""
  from moejax.data import load_datasets  # pylint: disable=g-import-not-at-top
  config = parse(golden_config("dense"))
  load_datasets(config.data, workdir=path, batch_size=config.train.batch_size)
  return path


def main(methods) -> None:
  golden = json.loads(GOLDEN_FILE.read_text()) if GOLDEN_FILE.exists() else {}
  with tempfile.TemporaryDirectory() as tmp:
    prepared = prepare(pathlib.Path(tmp) / "prepared")
    for method in methods:
      workdir = pathlib.Path(tmp) / method
      shutil.copytree(prepared, workdir)
      golden[method] = golden_metrics(method, workdir)
      print(method, golden[method]["train/loss"][-1], flush=True)
  GOLDEN_FILE.write_text(json.dumps(
      {m: golden[m] for m in METHODS if m in golden}, indent=1) + "\n")


if __name__ == "__main__":
  unknown = [m for m in sys.argv[1:] if m not in METHODS]
  if unknown:
    sys.exit(f"unknown preset {unknown}; valid: {', '.join(METHODS)}")
  main(sys.argv[1:] or METHODS)
