"""Size presets: what they set, what wins over them, and the documented counts."""

import dataclasses
import pathlib
import re

import pytest

from moejax.errors import ConfigError
from moejax.models.sizes import SIZES, param_counts
from moejax.train import default_config, parse

CONFIGS_DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "configs.md"


def _model(**keys):
  c = default_config()
  c.model.update(keys)
  return parse(c).model


@pytest.mark.parametrize("size", list(SIZES))
def test_a_preset_sets_the_shape(size):
  model = _model(size=size)
  assert {k: getattr(model, k) for k in SIZES[size]} == SIZES[size]


def test_keys_set_beside_a_preset_win():
  model = _model(size="base", num_layers=6)
  assert (model.num_layers, model.d_model, model.d_ff) == (6, 768, 3072)
  assert _model(size="").d_model == default_config().model.d_model


def test_unknown_size_is_a_one_line_error():
  with pytest.raises(ConfigError, match="model.size='huge' is not a preset; "
                     "choose one of tiny, small, medium, transformer_base, base, large"):
    _model(size="huge")


def test_param_counts_by_hand():
  # tiny, dense, V=1024, L=128: embedding 1024*64 + positions 128*64 = 73,728;
  # per block: attention 4*64*64 = 16,384, FFN 2*64*256 = 32,768, two norms
  # 128; final norm 64. 73,728 + 2 * 49,280 + 64 = 172,352.
  dense = dataclasses.replace(_model(size="tiny"), moe_layers=())
  assert param_counts(dense) == (172_352, 172_352)


def test_documented_table_is_true():
  rows = [r for r in re.findall(r"^\| `(\w+)`[^|]*\|" + r"([^|]*)\|" * 7,
                                CONFIGS_DOC.read_text(), flags=re.M) if r[0] in SIZES]
  assert [r[0] for r in rows] == list(SIZES)
  for size, *cells in rows:
    numbers = [int(c.strip().replace(",", "")) for c in cells]
    model = _model(size=size)
    assert numbers[:4] == [SIZES[size][k] for k in ("num_layers", "d_model",
                                                     "num_heads", "d_ff")]
    total, active = param_counts(model)
    dense, _ = param_counts(dataclasses.replace(model, moe_layers=()))
    assert numbers[4:] == [dense, total, active], size
