"""Path rules over param trees (`moejax.pytree`) and the model's paths
(`moejax.layout`)."""

import re

import pytest

from moejax import layout
from moejax.errors import ConfigError
from moejax.pytree import count_matches, match_rules, nest, select, update

TREE = {"block_0": {"ffn": {"w_in": {"kernel": 1}, "w_out": {"kernel": 2}}},
        "block_1": {"moe": {"router": {"gate": {"kernel": 3}},
                            "experts": {"w_in": 4}}},
        "embedding": 5}


def test_a_regex_matches_the_whole_path_and_a_predicate_the_same():
  assert count_matches(TREE, [r".*/router/.*"]) == 1
  assert count_matches(TREE, [r"router"]) == 0  # Not a search: the whole path.
  assert match_rules(TREE, [lambda p: p.startswith("block_1/")]) == match_rules(
      TREE, [re.compile(r"block_1/.*")])
  assert count_matches(TREE, [r"embedding", lambda p: p.endswith("w_in")]) == 2


def test_select_finds_the_outermost_matching_subtrees_in_order():
  assert list(select(TREE, r"block_\d+(/.*)?")) == ["block_0", "block_1"]
  assert select(TREE, r".*/w_in") == {"block_0/ffn/w_in": {"kernel": 1},
                                      "block_1/moe/experts/w_in": 4}
  assert select(TREE, r"nothing") == {}


def test_update_replaces_only_the_matches():
  out = update(TREE, r".*/w_in(/kernel)?", lambda path, node: path)
  assert out["block_0"]["ffn"]["w_in"] == "block_0/ffn/w_in"
  assert out["block_1"]["moe"]["experts"]["w_in"] == "block_1/moe/experts/w_in"
  assert out["block_0"]["ffn"]["w_out"] == TREE["block_0"]["ffn"]["w_out"]
  assert out["embedding"] == 5 and TREE["block_0"]["ffn"]["w_in"] == {"kernel": 1}


def test_nest_inverts_slash_paths():
  assert nest({"a/b": 1, "a/c/d": 2, "e": 3}) == {"a": {"b": 1, "c": {"d": 2}},
                                                  "e": 3}


def test_layout_names_blocks_and_their_moe_layers():
  assert layout.block_index("block_12/moe/router/gate/kernel") == 12
  with pytest.raises(ConfigError, match="not inside a block_<i>"):
    layout.block_index("embedding")
  assert list(select(TREE, layout.ffn_rule())) == ["block_0/ffn"]
  assert select(TREE, layout.ffn_rule((1, 2))) == {}
  assert select(TREE, layout.ffn_rule(())) == {}
  assert layout.moe_path(layout.layer_name(3)) == f"{layout.block_name(3)}/moe"
  with pytest.raises(ConfigError, match="layer_<i>"):
    layout.moe_path("block_3")
