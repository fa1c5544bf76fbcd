"""A run's `config.json` back to an experiment ConfigDict, and config files.

`config.json` holds the resolved `RunConfig` (typed dataclasses, every stage's
model spelled out); `config_from_json` rebuilds a `default_config()`-shaped
ConfigDict that `parse` maps to the same RunConfig, so a run's config can be
passed back as `--config <workdir>/config.json` and overridden like any other.
"""

from typing import Any

import ml_collections

from moejax.errors import ConfigError
from moejax.stages.transforms import get_transition
from moejax.train.config import default_config, stage_config


def _model_keys(model: dict[str, Any], keys) -> dict[str, Any]:
  """The `config.model` keys of one resolved TransformerConfig (as JSON)."""
  moe = model["moe"]
  out = {}
  for key in keys:
    if key in ("moe_layers", "encoder_moe_layers"):
      out[key] = ",".join(str(i) for i in model.get(key, ())) or "none"
    elif key == "expert_d_ff":
      out[key] = moe["d_ff"]
    elif key == "router_options":
      out[key] = {k: v for k, v in moe["router_options"]}
    elif key in model and key != "moe":
      out[key] = model[key]
    elif key in moe:
      out[key] = moe[key]
  return out


def _stage(entry: dict[str, Any], keys, open_length: bool
           ) -> ml_collections.ConfigDict:
  frozen = tuple(entry["frozen"])
  options = {k: v for k, v in entry["transform_options"]}
  if entry["transform"]:  # parse() appends the transform's own rules again.
    added = get_transition(entry["transform"], options)[0].frozen
    if added and frozen[len(frozen) - len(added):] == tuple(added):
      frozen = frozen[:len(frozen) - len(added)]
  return stage_config(entry["name"], steps=0 if open_length else entry["steps"],
                      model=_model_keys(entry["model"], keys), frozen=frozen,
                      transform=entry["transform"], transform_options=options)


def config_from_json(resolved: dict[str, Any]) -> ml_collections.ConfigDict:
  """The ConfigDict that `parse` turns into the RunConfig `resolved` describes.

  A single stage named `train` becomes `stages=[]` (its length follows
  `train.steps`); with several, the last stage takes the remaining steps, so a
  longer `train.steps` lengthens it, as in the config that wrote the run.
  """
  c = default_config()
  try:
    stages = resolved["stages"]
    model_keys = list(c.model.keys())
    c.model.update(_model_keys(resolved["model"], model_keys))
    for section in ("data", "train", "optim", "mesh"):
      for key, value in resolved[section].items():
        if key in c[section]:
          c[section][key] = value
  except (KeyError, TypeError, AttributeError) as e:
    raise ConfigError(f"config.json is not a moejax run config ({e!r}); pass "
                      "the config.json of a moejax workdir") from None
  single = (len(stages) == 1 and stages[0]["name"] == "train"
            and not stages[0]["transform"] and not stages[0]["frozen"])
  if not single:
    # Every stage spells out its model and router options, so the base router
    # carries none (a stage with the same router would inherit them).
    c.model.router_options = {}
    c.stages = [_stage(entry, model_keys, i == len(stages) - 1)
                for i, entry in enumerate(stages)]
  return c
