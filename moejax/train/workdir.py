"""The run directory: the resolved config and the check that a resume matches it.

Workdirs are epath paths (local, or a URI such as gs://...); in a multi-process
run only process 0 calls `record_config`.
"""

import json
import os
from typing import Any

from etils import epath

from moejax.errors import CheckpointError, storage_error
from moejax.paths import PathLike, as_path

CONFIG_FILE = "config.json"
# Config keys that decide the shapes in a checkpoint or the data it was trained on.
_MUST_MATCH = ("model", "stages", "data.source", "data.seq_len", "data.vocab_size",
               "data.eval_fraction", "data.max_bytes", "data.seed",
               "data.test_fraction")


def _as_json(resolved: dict[str, Any]) -> dict[str, Any]:
  """What `resolved` reads back as from config.json (tuples become lists)."""
  return json.loads(json.dumps(resolved))


def _structure(resolved: dict[str, Any]) -> dict[str, Any]:
  """`resolved` without stage lengths: a longer run may resume a shorter one."""
  out = dict(resolved)
  out["stages"] = [{k: v for k, v in st.items() if k != "steps"}
                   for st in resolved.get("stages", [])]
  return out


def _get(tree: dict[str, Any], dotted: str) -> Any:
  for part in dotted.split("."):
    tree = tree.get(part, {}) if isinstance(tree, dict) else {}
  return tree


def _first_difference(old: Any, new: Any, prefix: str) -> str | None:
  if isinstance(old, dict) and isinstance(new, dict):
    for key in sorted(set(old) | set(new)):
      diff = _first_difference(old.get(key), new.get(key), f"{prefix}.{key}")
      if diff:
        return diff
    return None
  if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
    old, new = list(old), list(new)
  return None if old == new else f"{prefix}: {old!r} in the workdir, {new!r} now"


def saved_config(workdir: PathLike) -> dict[str, Any] | None:
  """The resolved config of the run in `workdir`, None for a new workdir."""
  path = as_path(workdir) / CONFIG_FILE
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError:
    raise CheckpointError(f"{path} is not valid JSON; point --workdir at a new "
                          "directory") from None


def check_workdir(workdir: PathLike, resolved: dict[str, Any]) -> None:
  """Raises CheckpointError if `workdir` holds a run whose `_MUST_MATCH` keys
  differ from `resolved`. Reads only."""
  workdir = as_path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise CheckpointError(f"--workdir {workdir} is a file; point it at a directory")
  saved = saved_config(workdir)
  if saved is None:
    return
  saved, resolved = _structure(saved), _structure(_as_json(resolved))
  for key in _MUST_MATCH:
    diff = _first_difference(_get(saved, key), _get(resolved, key), key)
    if diff:
      raise CheckpointError(
          f"workdir {workdir} holds a run with a different config ({diff}); use "
          "a new --workdir or the config that wrote it")


def record_config(workdir: PathLike, resolved: dict[str, Any]) -> None:
  """Writes `config.json` on a first run; a later run whose other keys changed
  (say a longer `train.steps`) is recorded in `config.<n>.json` beside it."""
  workdir: epath.Path = as_path(workdir)
  saved, resolved = saved_config(workdir), _as_json(resolved)
  workdir.mkdir(parents=True, exist_ok=True)
  if saved is None:
    path = workdir / CONFIG_FILE
  elif saved != resolved:
    n = 1
    while (workdir / f"config.{n}.json").exists():
      n += 1
    path = workdir / f"config.{n}.json"
  else:
    return
  # Atomic: a run killed mid-write must not leave a config.json that bricks
  # every later resume.
  tmp = workdir / f".{path.name}.{os.getpid()}.tmp"
  try:
    tmp.write_text(json.dumps(resolved, indent=2) + "\n")
    tmp.replace(path)
  except OSError as e:
    raise storage_error("the config to", path, e) from None
