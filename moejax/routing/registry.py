"""Routers by name: the one place that turns `model.router` into a module."""

import dataclasses
from typing import Any

from moejax.errors import ConfigError
from moejax.routing.base_layer import BaseLayerRouter
from moejax.routing.contract import Router
from moejax.routing.dselect import DSelectKRouter
from moejax.routing.dts import DTSRouter
from moejax.routing.expert_choice import ExpertChoiceRouter
from moejax.routing.hashing import HashRouter
from moejax.routing.remoe import ReMoERouter
from moejax.routing.stablemoe import StableMoERouter
from moejax.routing.topk import SwitchRouter, TopKRouter

ROUTERS: dict[str, type[Router]] = {
    "switch": SwitchRouter,
    "topk": TopKRouter,
    "expert_choice": ExpertChoiceRouter,
    "base": BaseLayerRouter,
    "hash": HashRouter,
    "dselect_k": DSelectKRouter,
    "stablemoe": StableMoERouter,
    "dts": DTSRouter,
    "remoe": ReMoERouter,
}

for _name, _cls in ROUTERS.items():
  _cls.router_name = _name  # What errors call it.

_COMMON_FIELDS = ("num_experts", "top_k", "vocab_size", "parent", "name")


def router_class(name: str) -> type[Router]:
  """The router class registered as `name`; a ConfigError lists valid names."""
  try:
    return ROUTERS[name]
  except KeyError:
    raise ConfigError(
        f"unknown router {name!r}; valid routers: {', '.join(sorted(ROUTERS))}"
    ) from None


def router_options(name: str) -> dict[str, Any]:
  """The options of router `name` with their defaults."""
  cls = router_class(name)
  return {f.name: f.default for f in dataclasses.fields(cls)
          if f.name not in _COMMON_FIELDS and f.init}


def check_router(name: str, *, num_experts: int, top_k: int,
                 options: dict[str, Any] | None = None,
                 dispatch: str | None = None) -> type[Router]:
  """Validates a router name, its sizes and options (and, given `dispatch`,
  that its routing can feed that path) without building it."""
  cls = router_class(name)
  valid = router_options(name)
  for key in options or {}:
    if key not in valid:
      raise ConfigError(
          f"router {name!r} has no option {key!r}; valid options: "
          f"{', '.join(sorted(valid)) or '(none)'}")
  cls.check_options({**valid, **(options or {})}, num_experts=num_experts,
                    top_k=top_k)
  if dispatch is not None:
    cls.check_dispatch(dispatch)
  return cls


def make_router(name: str, *, num_experts: int, top_k: int = 1,
                vocab_size: int = 0, options: dict[str, Any] | None = None,
                dispatch: str | None = None) -> Router:
  """Builds router `name` after checking it can work (`check_router`).

  The module is unbound (`parent=None`) so that the MoE layer it is passed to
  adopts it: its params live under `<moe layer>/router`.
  """
  cls = check_router(name, num_experts=num_experts, top_k=top_k,
                     options=options, dispatch=dispatch)
  return cls(num_experts=num_experts, top_k=top_k, vocab_size=vocab_size,
             parent=None, **dict(options or {}))
