"""Routers behind one contract (`Routing`), their registry and auxiliary losses."""

from moejax.routing.contract import Router, Routing
from moejax.routing.losses import (expert_fractions, load_balancing_loss,
                                   mean_entropy, router_z_loss)
from moejax.routing.registry import (ROUTERS, check_router, make_router,
                                     router_class, router_options)
from moejax.routing.topk import SwitchRouter, TopKRouter

__all__ = [
    "ROUTERS", "Router", "Routing", "SwitchRouter", "TopKRouter", "check_router",
    "expert_fractions", "load_balancing_loss", "make_router", "mean_entropy",
    "router_class", "router_options", "router_z_loss",
]
