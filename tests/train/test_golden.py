"""The golden run: every preset's first steps match the metrics recorded in
`tests/train/golden.json` (losses, aux losses, every router metric); then the
same workdir samples and evaluates (`tests/test_every_preset.check_trained`),
so each preset trains once per test session.

The numbers change only on purpose. After an intended change (a preset's
config, a routing formula), regenerate that preset's values and say why in the
commit:

  PYTHONPATH=. python -m tests.train.golden <preset> [<preset> ...]

Tolerance: rtol 1e-5, atol 1e-6, a few float32 ulps after 10 steps. A
refactor that keeps the program is bit-equal on one machine and jax version;
the slack covers float32 sums that another XLA version may fuse or order
differently, far below what any change to routing, a loss or a schedule moves.
"""

import json
import shutil

import numpy as np
import pytest

from moejax.train.presets import METHODS
from tests.test_every_preset import check_trained
from tests.train.golden import GOLDEN_FILE, STEPS, golden_metrics, prepare


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  return prepare(tmp_path_factory.mktemp("golden") / "prepared")


def test_every_preset_is_recorded():
  assert sorted(json.loads(GOLDEN_FILE.read_text())) == sorted(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_golden_run(method, prepared, tmp_path):
  expected = json.loads(GOLDEN_FILE.read_text())[method]
  workdir = tmp_path / method
  shutil.copytree(prepared, workdir)
  got = golden_metrics(method, workdir)
  assert sorted(got) == sorted(expected), method
  assert got["step"] == expected["step"]
  for key, values in expected.items():
    np.testing.assert_allclose(got[key], values, rtol=1e-5, atol=1e-6,
                               err_msg=f"{method} {key}")
  check_trained(workdir, STEPS)
