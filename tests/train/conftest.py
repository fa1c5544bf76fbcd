"""Shared by the fault tests: one small run config, its data prepared once, and
the rows of its uninterrupted run (the curve every resumed run must reproduce)."""

import pathlib
import shutil

import numpy as np
import pytest

from moejax.metrics.writers import read_metrics, series
from moejax.train import parse, train_and_evaluate
from tests.conftest import tiny_config
from tests.train.faults import write_config

FAULT_STEPS = 60


def fault_config(**overrides):
  """The tiny model for 60 steps, a row per step, checkpoints every 20."""
  return tiny_config(**{"train__steps": FAULT_STEPS, "train__log_every": 1,
                        "train__checkpoint_every": 20, "train__eval_every": 20,
                        **overrides})


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> pathlib.Path:
  """A workdir holding only the fault config's tokenizer and data cache."""
  from moejax.data import load_datasets  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp("prepared")
  config = parse(fault_config())
  load_datasets(config.data, workdir=path, batch_size=config.train.batch_size)
  return path


@pytest.fixture
def new_workdir(prepared, tmp_path):
  """A fresh workdir with the prepared data (no data preparation to wait for)."""
  def make(name: str = "run") -> pathlib.Path:
    path = tmp_path / name
    shutil.copytree(prepared, path)
    return path
  return make


@pytest.fixture(scope="session")
def straight(prepared, tmp_path_factory) -> list[dict]:
  """The metric rows of the fault config run without interruption."""
  path = tmp_path_factory.mktemp("straight") / "run"
  shutil.copytree(prepared, path)
  train_and_evaluate(parse(fault_config()), path, verbose=False)
  return read_metrics(path)


@pytest.fixture(scope="session")
def fault_config_file(tmp_path_factory) -> pathlib.Path:
  """The fault config as a file for `moejax-train --config`."""
  return write_config(tmp_path_factory.mktemp("configs") / "faults.py",
                      fault_config())


def assert_same_curve(workdir: pathlib.Path, straight_rows: list[dict],
                      keys=("train/loss", "train/aux_loss", "eval/loss")) -> None:
  """One row per step, with the values of the uninterrupted run."""
  rows = read_metrics(workdir)
  for key in keys:
    s_steps, s_values = series(straight_rows, key)
    steps, values = series(rows, key)
    assert steps == s_steps, key
    np.testing.assert_allclose(values, s_values, rtol=1e-6, err_msg=key)
