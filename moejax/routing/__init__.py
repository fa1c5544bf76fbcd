"""Routers behind one contract (`Routing`), their registry and auxiliary losses."""

from moejax.routing.base_layer import BaseLayerRouter, balanced_assignment
from moejax.routing.contract import Router, Routing
from moejax.routing.dselect import DSelectKRouter, smooth_step
from moejax.routing.expert_choice import ExpertChoiceRouter
from moejax.routing.hashing import (HashRouter, frequency_balanced_table,
                                    set_hash_tables, table_from_tokens)
from moejax.routing.losses import (expert_fractions, load_balancing_loss,
                                   mean_entropy, router_z_loss)
from moejax.routing.registry import (ROUTERS, check_router, make_router,
                                     router_class, router_options)
from moejax.routing.topk import SwitchRouter, TopKRouter

__all__ = [
    "BaseLayerRouter", "DSelectKRouter", "ExpertChoiceRouter", "HashRouter",
    "ROUTERS", "Router", "Routing", "SwitchRouter", "TopKRouter",
    "balanced_assignment", "check_router", "expert_fractions",
    "frequency_balanced_table", "load_balancing_loss", "make_router",
    "mean_entropy", "router_class", "router_options", "router_z_loss",
    "set_hash_tables", "smooth_step", "table_from_tokens",
]
