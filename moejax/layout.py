"""Where `moejax.models.TransformerLM` keeps its blocks in the param tree, as
names and rules, in both layouts.

Unrolled (the canonical layout): block i's variables are `block_<i>` (a dense
FFN `block_<i>/ffn`, a MoE layer `block_<i>/moe`); its MoE layer's outputs
(metrics, routes, traces) are named `layer_<i>`. An encoder-decoder
(`moejax.models.encdec`) keeps each stack's blocks under `encoder/` and
`decoder/` (`encoder/block_<i>/moe`), its outputs named `encoder_layer_<i>` and
`decoder_layer_<i>`; `block_position` tells the stacks' blocks apart and
`moe_ffn_rule(config)` selects the FFNs that are MoE in `config`, in every
stack. Stage transforms, replay and init transforms read and write this
layout.

Scanned (`model.scan_layers`): the blocks split into `Stack`s, each R copies of
a unit of U consecutive blocks (`stacks`: one dense + one MoE block for
`every_other`; a run of dense blocks, the MoE block, another run for
`middle`). Stack j's variables are `stack_<j>/block_<k>` for the unit's k-th
block, every leaf with a leading axis of R (logical axis `layers`): leaf [r]
is block `first + r * U + k`. `scanned` and `unrolled` convert any tree
holding such collections (variables, params, optimizer moments, a
checkpoint's state) between the two; outputs keep `layer_<i>` names in both.
An encoder-decoder has no scanned layout (ConfigError).
"""

import dataclasses
import re
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from moejax.errors import ConfigError

_BLOCK = re.compile(r"(?:(encoder|decoder)/)?block_(\d+)(/|$)")
_LAYER = re.compile(r"(?:(encoder|decoder)_)?layer_(\d+)")
_BLOCK_KEY = re.compile(r"block_\d+")
_STACK = re.compile(r"stack_(\d+)")
_STACK_PATH = re.compile(r"stack_\d+/")
DENSE_FFN = r"((encoder|decoder)/)?block_\d+/ffn"  # Every dense FFN.
LAYERS_AXIS = "layers"  # The logical name of a scanned leaf's leading axis.


def block_name(i: int) -> str:
  return f"block_{i}"


def layer_name(i: int, stack: str | None = None) -> str:
  """The name of block i's MoE layer in outputs: `layer_<i>`, or in the
  `stack` (`encoder`, `decoder`) of an encoder-decoder `<stack>_layer_<i>`."""
  return f"{stack}_layer_{i}" if stack else f"layer_{i}"


def stack_name(j: int) -> str:
  return f"stack_{j}"


def in_stack(path: str) -> bool:
  """Whether a param path lies in a scanned stack ('stack_0/block_1/...'), its
  leaf carrying the leading `layers` axis."""
  return _STACK_PATH.match(path) is not None


def block_position(path: str) -> tuple[str | None, int]:
  """(stack, i) of the block a param path lies in: (None, 3) for
  'block_3/ffn/w_in' (decoder LM, encoder), ('encoder', 3) for
  'encoder/block_3/ffn/w_in' (encoder-decoder)."""
  match = _BLOCK.match(path)
  if match is None:
    raise ConfigError(f"param path {path!r} is not inside a block_<i>")
  return match.group(1), int(match.group(2))


def block_index(path: str) -> int:
  """i of the block a top-level param path lies in ('block_3/ffn/w_in' -> 3);
  a stack's path ('encoder/block_3/...') needs `block_position`."""
  stack, i = block_position(path)
  if stack is not None:
    raise ConfigError(f"param path {path!r} lies in the {stack} stack; its "
                      "block index alone is ambiguous (use block_position)")
  return i


def ffn_rule(layers: Iterable[int] | None = None,
             stack: str | None = None) -> str:
  """Regex over paths: the dense FFNs of blocks `layers` (None: every block)
  at the top level (`stack` None: decoder LM, encoder) or in `stack`
  (`encoder`, `decoder`); None for both: every dense FFN anywhere."""
  prefix = f"{stack}/" if stack else ""
  if layers is None:
    return rf"{prefix}block_\d+/ffn" if stack else DENSE_FFN
  return "|".join(f"{prefix}{block_name(i)}/ffn"
                  for i in sorted(set(layers))) or "(?!)"


def moe_ffn_rule(config) -> str:
  """Regex over paths: the dense FFNs at the blocks that are MoE in `config`
  (a TransformerConfig), in each of its stacks (`moe_layers`, and an
  encoder-decoder's `encoder_moe_layers` under `encoder/`); no other stack's
  block of the same index."""
  rules = [ffn_rule(st.moe_layers, st.name) for st in config.block_stacks
           if st.moe_layers]
  return "|".join(rules) or "(?!)"


def moe_path(layer: str) -> str:
  """Where MoE layer `layer` ('layer_1', 'encoder_layer_3') keeps its variables
  ('block_1/moe', 'encoder/block_3/moe')."""
  match = _LAYER.fullmatch(layer)
  if match is None:
    raise ConfigError(f"{layer!r} is not a MoE layer's name (layer_<i>, "
                      "encoder_layer_<i>, decoder_layer_<i>)")
  stack = f"{match.group(1)}/" if match.group(1) else ""
  return f"{stack}{block_name(int(match.group(2)))}/moe"


@dataclasses.dataclass(frozen=True)
class Stack:
  """R copies of a unit of U consecutive blocks, run as one scanned unit.

  Attributes:
    first: index of the stack's first block.
    unit: whether each of the unit's U blocks is a MoE block.
    repeats: R.
  """

  first: int
  unit: tuple[bool, ...]
  repeats: int

  def block(self, r: int, k: int) -> int:
    """Index of copy r's k-th block."""
    return self.first + r * len(self.unit) + k

  @property
  def moe_positions(self) -> tuple[int, ...]:
    """k of the unit's MoE blocks."""
    return tuple(k for k, is_moe in enumerate(self.unit) if is_moe)


def _copies(pattern: tuple[bool, ...], start: int, size: int) -> int:
  unit, n = pattern[start:start + size], 1
  while pattern[start + n * size:start + (n + 1) * size] == unit:
    n += 1
  return n


def stacks(num_layers: int, moe_layers: Iterable[int]) -> tuple[Stack, ...]:
  """The blocks as stacks, front to back: at each block, the unit repeated at
  least twice whose copies cover the most blocks from there (the shortest unit
  on a tie), else the block alone. A periodic placement is one stack; any
  placement compiles at most a few distinct units, whatever the depth."""
  moe = set(moe_layers)
  pattern = tuple(i in moe for i in range(num_layers))
  out, start = [], 0
  while start < num_layers:
    repeated = [u for u in range(1, (num_layers - start) // 2 + 1)
                if _copies(pattern, start, u) > 1]
    best = max(repeated, key=lambda u: (u * _copies(pattern, start, u), -u),
               default=1)
    repeats = _copies(pattern, start, best)
    out.append(Stack(start, pattern[start:start + best], repeats))
    start += best * repeats
  return tuple(out)


def _is_block_key(key: Any) -> bool:
  return _BLOCK_KEY.fullmatch(str(key)) is not None


def _is_layer_dict(x: Any) -> bool:
  return isinstance(x, dict) and any(
      _is_block_key(k) or _STACK.fullmatch(str(k)) for k in x)


def _over_layer_dicts(tree: Any, fn: Callable[[dict], dict]) -> Any:
  """`tree` with `fn` applied to every dict that holds blocks or stacks (a
  collection, a params tree, an optimizer moment), wherever it sits."""
  return jax.tree.map(lambda x: fn(x) if _is_layer_dict(x) else x, tree,
                      is_leaf=_is_layer_dict)


def _stack_one(level: dict, plan: tuple[Stack, ...]) -> dict:
  out = {k: v for k, v in level.items() if not _is_block_key(k)}
  for j, st in enumerate(plan):
    stacked = {}
    for k in range(len(st.unit)):
      names = [block_name(st.block(r, k)) for r in range(st.repeats)]
      present = [n in level for n in names]
      if not any(present):
        continue
      if not all(present):
        raise ConfigError(f"cannot scan {', '.join(names)}: only some are in "
                          "the tree; their structures must match")
      stacked[block_name(k)] = jax.tree.map(
          lambda *xs: jnp.stack(xs), *[level[n] for n in names])
    if stacked:
      out[stack_name(j)] = stacked
  return out


def _unstack_one(level: dict, plan: tuple[Stack, ...]) -> dict:
  out = {k: v for k, v in level.items() if not _STACK.fullmatch(str(k))}
  for j, st in enumerate(plan):
    for k, sub in level.get(stack_name(j), {}).items():
      unit_k = block_index(k)
      for r in range(st.repeats):
        out[block_name(st.block(r, unit_k))] = jax.tree.map(
            lambda x: x[r], sub)
  blocks = sorted((k for k in out if _is_block_key(k)), key=block_index)
  return {**{k: out[k] for k in blocks},
          **{k: v for k, v in out.items() if not _is_block_key(k)}}


def _plan(config) -> tuple[Stack, ...]:
  if config.arch == "encdec":
    raise ConfigError("model.arch='encdec' has no scanned layout; set "
                      "model.scan_layers False")
  return stacks(config.num_layers, config.moe_layers)


def scanned(tree: Any, config) -> Any:
  """`tree` (unrolled) in the scanned layout of `config` (a TransformerConfig)."""
  plan = _plan(config)
  return _over_layer_dicts(tree, lambda level: _stack_one(level, plan))


def unrolled(tree: Any, config) -> Any:
  """`tree` (scanned) in the unrolled layout of `config`."""
  plan = _plan(config)
  return _over_layer_dicts(tree, lambda level: _unstack_one(level, plan))


def to_model(tree: Any, config) -> Any:
  """`tree` (unrolled) in the layout `config` runs in."""
  return scanned(tree, config) if config.scan_layers else tree


def from_model(tree: Any, config) -> Any:
  """`tree` (in the layout `config` runs in) unrolled."""
  return unrolled(tree, config) if config.scan_layers else tree


def canonical(transform: Callable, config) -> Callable:
  """`transform` (of unrolled trees in, unrolled out) applied to trees in the
  layout of `config`: unrolled before, laid out again after."""
  def wrapped(tree, *args, **kwargs):
    return to_model(transform(from_model(tree, config), *args, **kwargs), config)
  return wrapped
