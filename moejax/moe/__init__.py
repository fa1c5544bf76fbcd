"""The MoE layer and its pure pieces: dispatch/combine and stacked experts."""

from moejax.moe.budgets import routed_ffn
from moejax.moe.routed import RoutedFFN
from moejax.moe.dispatch import (DISPATCH_PATHS, CapacityPlan, SortPlan,
                                 combine_capacity, combine_sorted,
                                 dispatch_capacity, dispatch_sorted,
                                 expert_capacity, plan_capacity, plan_dropless)
from moejax.moe.experts import Experts
from moejax.moe.layer import MoEAux, MoELayer

__all__ = [
    "DISPATCH_PATHS", "CapacityPlan", "Experts", "MoEAux", "MoELayer",
    "RoutedFFN", "SortPlan", "combine_capacity", "combine_sorted",
    "dispatch_capacity", "dispatch_sorted", "expert_capacity", "plan_capacity",
    "plan_dropless", "routed_ffn",
]
