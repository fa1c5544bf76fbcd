"""Routers behind one contract (`Routing`), their registry and auxiliary losses."""

from moejax.routing.balancing import (Balancing, grouped_balance_loss,
                                      parse_policy, update_bias)
from moejax.routing.base_layer import BaseLayerRouter, balanced_assignment
from moejax.routing.contract import ROUTER_STATE, Router, Routing, TokenLayout
from moejax.routing.dselect import DSelectKRouter, smooth_step
from moejax.routing.expert_choice import ExpertChoiceRouter
from moejax.routing.hashing import (HashRouter, frequency_balanced_table,
                                    frequency_tables, set_hash_tables,
                                    table_from_tokens)
from moejax.routing.losses import (expert_fractions, load_balancing_loss,
                                   mean_entropy, router_z_loss)
from moejax.routing.registry import (ROUTERS, check_router, make_router,
                                     router_class, router_options)
from moejax.routing.remoe import ReMoERouter, adapt_l1_coef, remoe_l1
from moejax.routing.topk import SwitchRouter, TopKRouter, group_limited_mask

__all__ = [
    "Balancing", "BaseLayerRouter", "DSelectKRouter", "ExpertChoiceRouter",
    "HashRouter", "ROUTERS", "ROUTER_STATE", "ReMoERouter", "Router", "Routing",
    "SwitchRouter", "TokenLayout", "TopKRouter", "adapt_l1_coef",
    "balanced_assignment", "check_router", "expert_fractions",
    "frequency_balanced_table", "frequency_tables", "group_limited_mask",
    "grouped_balance_loss", "load_balancing_loss", "make_router",
    "mean_entropy", "parse_policy", "remoe_l1", "router_class",
    "router_options", "router_z_loss", "set_hash_tables", "smooth_step",
    "table_from_tokens", "update_bias",
]
