"""The routed FFN at one static size: dispatch -> stacked experts -> combine.

Shapes: T tokens (of one device inside the expert-parallel body), D model
width, F hidden width, E experts, K top-k slots per token, C capacity of one
expert for one device's tokens, M routed rows, N devices splitting the
tokens, S slots of one device's tokens.

`RoutedFFN.create` checks the dispatch path and the mesh once, before the
router runs (a batch the mesh cannot split is the error to report); the
instance then runs T routed tokens at a given number of rows, on one device
(a global plan) or expert-parallel (`moejax.parallel.expert_parallel`):
- capacity: rows per expert per device, at most C;
- dropless: sorted rows per device, at most K times its tokens.
`moejax.moe.budgets` chooses the rows; here they are static.
"""

import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax.moe import dispatch
from moejax.moe.experts import capacity_ffn, grouped_ffn
from moejax.parallel import expert_parallel
from moejax.parallel.rules import TOKEN_AXES
from moejax.routing.contract import Routing


@dataclasses.dataclass(frozen=True)
class RoutedFFN:
  """dispatch -> experts -> combine of T tokens over one plan, checked.

  Attributes:
    path: `capacity` or `dropless`.
    num_experts: E.
    num_tokens: T.
    shards: devices that split the tokens (1 without a mesh).
    capacity_factor: C = ceil(capacity_factor * S * K / E) per device, unless
      the routing fixes the rows of an expert (`Slots.per_expert`).
    mesh: a `("data", "expert")` mesh to run expert-parallel on; None: one
      program, global plan.
    activation: the experts' nonlinearity.
    ragged_dot: the grouped matmul of the dropless path.
  """

  path: str
  num_experts: int
  num_tokens: int
  shards: int = 1
  capacity_factor: float = 1.25
  mesh: jax.sharding.Mesh | None = None
  activation: Callable[[jax.Array], jax.Array] = nn.gelu
  ragged_dot: Callable[..., jax.Array] = jax.lax.ragged_dot

  @classmethod
  def create(cls, path: str, *, num_tokens: int, num_experts: int,
             mesh: jax.sharding.Mesh | None = None, **kwargs) -> "RoutedFFN":
    """The routed FFN of T tokens; ConfigError for an unknown path or a mesh
    the tokens or experts do not split over."""
    if path not in dispatch.DISPATCH_PATHS:
      raise ConfigError(f"unknown dispatch {path!r}; valid: "
                        f"{', '.join(dispatch.DISPATCH_PATHS)}")
    shards = 1
    if mesh is not None:
      _, shards = expert_parallel.check_mesh(mesh, num_tokens, num_experts)
    return cls(path=path, num_experts=num_experts, num_tokens=num_tokens,
               shards=shards, mesh=mesh, **kwargs)

  @property
  def tokens(self) -> int:
    """S: the tokens of one device."""
    return self.num_tokens // self.shards

  def capacity(self, routing: Routing) -> int:
    """C: rows of one expert for one device's tokens on the capacity path."""
    top_k = routing.expert_TK.shape[1]
    per_expert = routing.slots.per_expert
    if self.mesh is None:
      return per_expert or dispatch.expert_capacity(
          self.num_tokens, self.num_experts, top_k, self.capacity_factor)
    return expert_parallel.local_capacity(self.tokens, self.num_experts, top_k,
                                          self.capacity_factor, per_expert)

  def full_rows(self, routing: Routing) -> int:
    """The rows that hold every slot of `routing` (the K-slot program)."""
    if self.path == "capacity":
      return self.capacity(routing)
    return self.tokens * routing.expert_TK.shape[1]

  @property
  def independent_slots(self) -> bool:
    """Whether disjoint sets of slots give independent sums (dropless drops
    nothing; on the capacity path slots compete for an expert's rows)."""
    return self.path == "dropless"

  def rows(self, routing: Routing, slots_per_token: float) -> int:
    """The rows of a budget of k slots per token: ceil(S * k) sorted rows
    (dropless) or ceil(C * k / K) rows per expert (capacity), at most all."""
    top_k = routing.expert_TK.shape[1]
    if self.path == "dropless":
      return min(self.tokens * top_k, math.ceil(self.tokens * slots_per_token))
    capacity = self.capacity(routing)
    return min(capacity, math.ceil(capacity * slots_per_token / top_k))

  def rows_needed(self, routing: Routing) -> jax.Array:
    """int32[]: the fewest rows that hold every slot the full program keeps,
    the largest over the devices that split the tokens (blocks of S)."""
    mask_NS = routing.mask_TK.reshape(self.shards, -1)
    if self.path == "dropless":
      return jnp.max(jnp.sum(mask_NS, axis=1, dtype=jnp.int32))
    expert_NS = jnp.where(mask_NS, routing.expert_TK.reshape(self.shards, -1),
                          self.num_experts)
    load_NE = jax.vmap(lambda e: jnp.bincount(e, length=self.num_experts + 1))(
        expert_NS)[:, :self.num_experts]
    return jnp.minimum(jnp.max(load_NE),
                       self.capacity(routing)).astype(jnp.int32)

  def __call__(self, rows: int, x_TD: jax.Array, routing: Routing,
               w_in_EDF: jax.Array, w_out_EFD: jax.Array, *,
               capacity: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(y [T, D], kept bool[T, K]) at `rows` (see the module docstring);
    `capacity` (default `self.capacity(routing)`) is C."""
    capacity = self.capacity(routing) if capacity is None else capacity
    if self.mesh is not None:
      return expert_parallel.expert_parallel_at(
          x_TD, routing, w_in_EDF, w_out_EFD, mesh=self.mesh, path=self.path,
          capacity=capacity, rows=rows, activation=self.activation,
          ragged_dot=self.ragged_dot)
    if self.path == "capacity":
      plan = dispatch.plan_capacity(routing.expert_TK, routing.mask_TK,
                                    self.num_experts, capacity, rows)
      y_ECD = capacity_ffn(dispatch.dispatch_capacity(x_TD, plan), w_in_EDF,
                           w_out_EFD, self.activation)
      return (dispatch.combine_capacity(y_ECD, plan, routing.weight_TK),
              plan.kept_TK)
    plan = dispatch.plan_dropless(routing.expert_TK, routing.mask_TK,
                                  self.num_experts, rows)
    y_MD = grouped_ffn(dispatch.dispatch_sorted(x_TD, plan), w_in_EDF,
                       w_out_EFD, plan.group_sizes_E, self.activation,
                       self.ragged_dot)
    y_TD = dispatch.combine_sorted(y_MD, plan, routing.weight_TK,
                                   routing.mask_TK)
    return y_TD, routing.mask_TK & plan.kept_TK


def token_shards(mesh: jax.sharding.Mesh | None) -> int:
  """Devices that split a batch's tokens on `mesh` (1 without one)."""
  if mesh is None:
    return 1
  return int(math.prod(mesh.shape[axis] for axis in TOKEN_AXES))
