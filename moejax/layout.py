"""Where `moejax.models.TransformerLM` keeps its blocks in the param tree, as
names and rules.

Block i's params are `block_<i>` (a dense FFN `block_<i>/ffn`, a MoE layer
`block_<i>/moe`); its MoE layer's outputs (metrics, routes, traces) are named
`layer_<i>`. Stage transforms and replay take paths from here, so a change of
layout (scanned blocks) is made in this module and the model only.
"""

import re
from typing import Iterable

from moejax.errors import ConfigError

_BLOCK = re.compile(r"block_(\d+)(/|$)")
_LAYER = re.compile(r"layer_(\d+)")
DENSE_FFN = r"block_\d+/ffn"  # Every dense FFN.


def block_name(i: int) -> str:
  return f"block_{i}"


def layer_name(i: int) -> str:
  return f"layer_{i}"


def block_index(path: str) -> int:
  """i of the block a param path lies in ('block_3/ffn/w_in' -> 3)."""
  match = _BLOCK.match(path)
  if match is None:
    raise ConfigError(f"param path {path!r} is not inside a block_<i>")
  return int(match.group(1))


def ffn_rule(layers: Iterable[int] | None = None) -> str:
  """Regex over paths: the dense FFNs of blocks `layers` (None: every block)."""
  if layers is None:
    return DENSE_FFN
  return "|".join(f"{block_name(i)}/ffn" for i in sorted(set(layers))) or "(?!)"


def moe_path(layer: str) -> str:
  """Where MoE layer `layer` ('layer_1') keeps its variables ('block_1/moe')."""
  match = _LAYER.fullmatch(layer)
  if match is None:
    raise ConfigError(f"{layer!r} is not a MoE layer's name (layer_<i>)")
  return f"{block_name(int(match.group(1)))}/moe"
