"""Param-tree plumbing shared by stages, optimizer, replay and sharding: paths,
path rules, overlays.

A path rule names params by their '/'-joined path ('block_1/moe/router/gate/kernel'):
a regex, which must match the whole path, or a predicate over the path. Rules
select leaves (`match_rules`: freezing, optimizer groups) or subtrees (`select`,
`update`: stage transforms), so no module spells the model's layout in code.
"""

import re
from typing import Any, Callable, Iterable, Mapping

from flax import traverse_util
import jax
import numpy as np


Rule = str | re.Pattern | Callable[[str], bool]


def path_str(path) -> str:
  """'block_1/moe/router/gate/kernel' for a jax key path."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def matcher(rule: Rule) -> Callable[[str], bool]:
  """The predicate of a path rule (a regex matches the whole path)."""
  if callable(rule) and not isinstance(rule, re.Pattern):
    return rule
  compiled = re.compile(rule)
  return lambda path: compiled.fullmatch(path) is not None


def match_rules(params, rules: Iterable[Rule]) -> Any:
  """A bool tree: True where a leaf's path matches one of `rules`."""
  predicates = [matcher(r) for r in rules]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(p(path_str(path)) for p in predicates), params)


def count_matches(params, rules: Iterable[Rule]) -> int:
  return sum(jax.tree.leaves(match_rules(params, rules)))


def select(tree: Mapping, rule: Rule, *, where: str = "") -> dict[str, Any]:
  """{path: node} of the outermost nodes (subtrees or leaves) of a nested dict
  whose path matches `rule`, in the tree's order; a match is not searched
  further."""
  matches, match = {}, matcher(rule)
  for key, node in tree.items():
    here = f"{where}/{key}" if where else str(key)
    if match(here):
      matches[here] = node
    elif isinstance(node, Mapping):
      matches.update(select(node, rule, where=here))
  return matches


def update(tree: Mapping, rule: Rule, fn: Callable[[str, Any], Any], *,
           where: str = "") -> dict:
  """`tree` (nested dicts) with each node `select` finds replaced by
  `fn(path, node)`; every other leaf kept (the same objects)."""
  out, match = {}, matcher(rule)
  for key, node in tree.items():
    here = f"{where}/{key}" if where else str(key)
    if match(here):
      out[key] = fn(here, node)
    elif isinstance(node, Mapping):
      out[key] = update(node, rule, fn, where=here)
    else:
      out[key] = node
  return out


def nest(flat: Mapping[str, Any]) -> dict:
  """{'a/b': x, 'a/c': y} -> {'a': {'b': x, 'c': y}}."""
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def overlay(template: dict, source: dict, *, where: str = "") -> dict:
  """`template` with every leaf that `source` also has (same path) replaced.

  Leaves only in `template` keep their value (fresh init for new params); leaves
  only in `source` are dropped (params the new model no longer has). A leaf at
  the same path with another shape is a bug in a transform: ValueError.
  """
  out = {}
  for key, value in template.items():
    here = f"{where}/{key}" if where else key
    if key not in source:
      out[key] = value
    elif isinstance(value, dict):
      if not isinstance(source[key], dict):
        raise ValueError(f"{here}: a subtree in the new model, a leaf in the source")
      out[key] = overlay(value, source[key], where=here)
    else:
      src = source[key]
      if tuple(np.shape(src)) != tuple(np.shape(value)):
        raise ValueError(f"{here}: shape {np.shape(src)} from the transform, "
                         f"{np.shape(value)} in the new model")
      out[key] = jax.numpy.asarray(src, dtype=value.dtype)
  return out

