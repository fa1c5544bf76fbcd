"""Grouped matmul kernels for the dropless MoE path, behind one function.

Shapes: M routed rows, I input width, O output width, G groups.

  grouped_matmul(lhs_MI, rhs_GIO, group_sizes_G,
                 impl="xla" | "pallas" | "megablox" | "tiled" | "auto")

`MATMUL_IMPLS` lists the names; `check_impl` raises a ConfigError for others.
"""

from moejax.kernels.grouped_matmul import (MATMUL_IMPLS, available_impls,
                                           check_impl, grouped_matmul,
                                           resolve_impl)
from moejax.kernels.pallas_impl import pallas_grouped_matmul

__all__ = [
    "MATMUL_IMPLS", "available_impls", "check_impl", "grouped_matmul",
    "pallas_grouped_matmul", "resolve_impl",
]
