"""Configs, references and checks shared by the multi-process tests.

A run is `configs/<name>.py` plus `--config.<key>=<value>` overrides; the same
overrides build the ConfigDict of an in-process reference run (this test
process has 8 CPU devices), so both sides train exactly the same thing.
"""

import collections
import importlib.util
import json
import pathlib

import numpy as np

from moejax.metrics.writers import read_metrics, series
from tests.multihost.launch import REPO

# A two-block model on 150 KB of the embedded corpus, 30 steps with probes.
TINY = {
    "train.steps": 30, "train.batch_size": 8, "train.log_every": 5,
    "train.eval_every": 10, "train.checkpoint_every": 10, "train.probe_every": 5,
    "model.num_layers": 2, "model.d_model": 32, "model.num_heads": 2,
    "model.d_ff": 64, "data.max_bytes": 150_000, "data.vocab_size": 512,
    "data.seq_len": 32, "data.eval_batches": 2,
}
STABLEMOE = {**TINY, "model.router_options.distill_dim": 8}
COMPARED = ("train/loss", "train/aux_loss", "eval/loss", "router/fluctuation")


def flags(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def cli_args(config: str, workdir: pathlib.Path, overrides: dict) -> list[str]:
  return ["--config", config, "--workdir", str(workdir), *flags(overrides)]


def config_dict(config: str, overrides: dict):
  """`get_config(<arg>)` of `configs/<name>.py[:<arg>]` with `overrides` applied."""
  path, _, arg = config.partition(":")
  spec = importlib.util.spec_from_file_location("run_config", REPO / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg) if arg else module.get_config()
  for dotted, value in overrides.items():
    *parents, key = dotted.split(".")
    node = c
    for part in parents:
      node = node[part]
    node[key] = value
  return c


def reference(config: str, workdir: pathlib.Path, overrides: dict) -> dict:
  """The same run in this process (one process, 8 devices): its summary."""
  from moejax.train import parse, train_and_evaluate  # pylint: disable=g-import-not-at-top
  return train_and_evaluate(parse(config_dict(config, overrides)), workdir,
                            verbose=False)


def assert_same_run(got: pathlib.Path, want: pathlib.Path, rtol: float = 1e-6):
  """Equal loss curves, evaluations, fluctuation rows and settling curve."""
  rows_got, rows_want = read_metrics(got), read_metrics(want)
  for key in COMPARED:
    steps_got, values_got = series(rows_got, key)
    steps_want, values_want = series(rows_want, key)
    assert steps_got == steps_want, key
    np.testing.assert_allclose(values_got, values_want, rtol=rtol, err_msg=key)
  curve_got = json.loads((got / "fluctuation.json").read_text())
  curve_want = json.loads((want / "fluctuation.json").read_text())
  assert curve_got["steps"] == curve_want["steps"]
  np.testing.assert_allclose(curve_got["settled_share"],
                             curve_want["settled_share"], atol=1e-9)


def _under(path: str, folder: pathlib.Path) -> bool:
  return path == str(folder) or path.startswith(str(folder) + "/")


def workdir_writers(results, workdir: pathlib.Path) -> dict[str, set[int]]:
  """Which processes wrote each path of `workdir` outside `checkpoints/`."""
  owners = collections.defaultdict(set)
  for r in results:
    for _, path in r.writes:
      if _under(path, workdir) and not _under(path, workdir / "checkpoints"):
        owners[path].add(r.index)
  return dict(owners)


def assert_process0_writes_workdir(results, workdir: pathlib.Path) -> None:
  """Every workdir write outside orbax's `checkpoints/` came from process 0,
  and every file there now was seen being written (the audit is not blind)."""
  owners = workdir_writers(results, workdir)
  others = {p: sorted(s) for p, s in owners.items() if s != {0}}
  assert not others, f"written by processes other than 0: {others}"
  files = {str(p) for p in workdir.rglob("*")
           if p.is_file() and not _under(str(p), workdir / "checkpoints")}
  assert files and files <= set(owners), f"unrecorded writes: {files - set(owners)}"
