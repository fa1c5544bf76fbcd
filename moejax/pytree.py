"""Param-tree plumbing shared by stages, optimizer and sharding: paths, path
rules, overlays."""

import re
from typing import Any, Iterable

import jax
import numpy as np


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


def match_rules(params, patterns: Iterable[str]) -> Any:
  """A bool tree: True where a param's path fully matches one of `patterns`."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(c.fullmatch(path_str(path)) for c in compiled), params)


def count_matches(params, patterns: Iterable[str]) -> int:
  return sum(jax.tree.leaves(match_rules(params, patterns)))


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

