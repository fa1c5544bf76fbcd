"""The run directory: the resolved config and the check that a resume matches it."""

import json
import pathlib
from typing import Any

from moejax.errors import CheckpointError

CONFIG_FILE = "config.json"
# Config keys that decide the shapes in a checkpoint or the data it was trained on.
_MUST_MATCH = ("model", "data.source", "data.seq_len", "data.vocab_size",
               "data.eval_fraction", "data.max_bytes", "data.seed")


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


def prepare_workdir(workdir: pathlib.Path, resolved: dict[str, Any]) -> None:
  """Creates `workdir`, or checks that the run already there used this config.

  Writes `config.json` on a first run. On a later run, the keys in `_MUST_MATCH`
  must be unchanged (else CheckpointError, nothing written); other changes (say a
  longer `train.steps`) are recorded in `config.<n>.json` next to the original.
  """
  path = workdir / CONFIG_FILE
  if not path.exists():
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(resolved, indent=2) + "\n")
    return
  try:
    saved = json.loads(path.read_text())
  except json.JSONDecodeError:
    raise CheckpointError(f"{path} is not valid JSON; point --workdir at a new "
                          "directory") from None
  for key in _MUST_MATCH:
    diff = _first_difference(_get(saved, key), _get(resolved, key), key)
    if diff:
      raise CheckpointError(
          f"workdir {workdir} holds a run with a different config ({diff}); use "
          "a new --workdir or the config that wrote it")
  if saved != resolved:
    n = 1
    while (workdir / f"config.{n}.json").exists():
      n += 1
    (workdir / f"config.{n}.json").write_text(json.dumps(resolved, indent=2) + "\n")
