"""Expert parallelism: dispatch -> expert FFN -> combine inside `jax.shard_map`.

Shapes: T tokens (of the whole batch outside `shard_map`; inside the per-device
bodies, the T / (data * expert) of one device), D model width, F hidden width,
E experts, K top-k slots per token, C capacity of one expert for one device's
tokens, M routed rows of one device (at most T * K), N devices on the `expert`
axis, G groups (the E / N experts one device holds), R buffer rows (capacity:
the N * C a local expert gets; dropless: a chunk of at most T * min(K, G) one
device sends another, or the N chunks it receives).

The router runs outside, on all T tokens (XLA adds the communication its global
operations need); this module takes its `Routing` and does the rest per device:
- capacity: each device plans [E, C, D] buffers from its own T tokens; an
  all_to_all over `expert` turns them into [G, R, D] for the local experts, and
  the reverse all_to_all brings results home for the local combine. Capacity is
  per device, C = ceil(cf * T * K / E) (a router-fixed C becomes min(C, T)), so
  a device drops its own overflow even where another device's share has room.
- dropless: slots sorted by expert go out with a ragged all-to-all and land on
  the owner grouped by local expert, then by source, so the grouped matmul needs
  no second sort; results return the same way. XLA:CPU has no
  ragged-all-to-all: there `dense_ragged_all_to_all` computes the same result
  with one dense all_to_all of [N, R, D] per-destination chunks.

The chunk bound assumes a token's K slots name distinct experts, as every
router in `moejax.routing` does. All communication of the expert-parallel
layer is here.
"""

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax.errors import ConfigError
from moejax.moe import dispatch
from moejax.moe.experts import capacity_ffn, grouped_ffn
from moejax.parallel.rules import EXPERT_AXIS, MESH_AXES, TOKEN_AXES
from moejax.routing.contract import Routing

EXCHANGES = ("ragged", "dense")
_RAGGED_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


def default_exchange(backend: str | None = None) -> str:
  """`ragged` where XLA has ragged-all-to-all (GPU, TPU), else `dense`."""
  backend = backend or jax.default_backend()
  return "ragged" if backend in _RAGGED_BACKENDS else "dense"


def local_capacity(num_local_tokens: int, num_experts: int, top_k: int,
                   capacity_factor: float,
                   router_capacity: int | None = None) -> int:
  """C for one device's T tokens; a router-fixed C is kept whole (no extra drops)."""
  if router_capacity is not None:
    return max(1, min(router_capacity, num_local_tokens))
  return dispatch.expert_capacity(num_local_tokens, num_experts, top_k,
                                  capacity_factor)


def _packed_slots(sizes_NG: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
  """For slices packed back to back in each row n: (slice, offset in it) of rows.

  Both are [N, rows]; the slice is G (one past the last) after all slices.
  """
  ends_NG = jnp.cumsum(sizes_NG, axis=1)
  r_R = jnp.arange(rows, dtype=sizes_NG.dtype)
  slot_NR = jnp.sum(r_R[None, None, :] >= ends_NG[:, :, None], axis=1)
  last = sizes_NG.shape[1] - 1
  start_NR = jnp.take_along_axis(ends_NG - sizes_NG, jnp.minimum(slot_NR, last),
                                 axis=1)
  return slot_NR, r_R[None, :] - start_NR


def dense_ragged_all_to_all(operand: jax.Array, output: jax.Array,
                            input_offsets: jax.Array, send_sizes: jax.Array,
                            output_offsets: jax.Array, recv_sizes: jax.Array, *,
                            axis_name: str, chunk_rows: int | None = None
                            ) -> jax.Array:
  """`jax.lax.ragged_all_to_all` for 2-D operands, from one dense all_to_all.

  Each device packs what it sends to device j into row j of an [N, chunk_rows, D]
  buffer (chunk_rows: most rows sent to one device; default all of `operand`),
  exchanges it, and scatters the received slices to their output offsets.
  """
  n = jax.lax.axis_size(axis_name)
  chunk = operand.shape[0] if chunk_rows is None else chunk_rows
  per_device = input_offsets.shape[0] // n
  a2a = functools.partial(jax.lax.all_to_all, axis_name=axis_name, split_axis=0,
                          concat_axis=0, tiled=True)
  send_NG = send_sizes.reshape(n, per_device)
  slot_NR, within_NR = _packed_slots(send_NG, chunk)
  sent_NR = slot_NR < per_device
  source_NR = jnp.take_along_axis(input_offsets.reshape(n, per_device),
                                  jnp.minimum(slot_NR, per_device - 1),
                                  axis=1) + within_NR
  source_NR = jnp.where(sent_NR, source_NR, 0)
  buf_NRD = jnp.where(sent_NR[..., None], operand[source_NR], 0)
  recv_NRD = a2a(buf_NRD)
  recv_NG = recv_sizes.reshape(n, per_device)
  land_NG = a2a(output_offsets.reshape(n, per_device))
  slot_NR, within_NR = _packed_slots(recv_NG, chunk)
  dest_NR = jnp.take_along_axis(land_NG, jnp.minimum(slot_NR, per_device - 1),
                                axis=1) + within_NR
  dest_NR = jnp.where(slot_NR < per_device, dest_NR, output.shape[0])
  return output.at[dest_NR.reshape(-1)].set(
      recv_NRD.reshape(-1, operand.shape[1]).astype(output.dtype), mode="drop")


def _capacity_local(x_TD, expert_TK, weight_TK, mask_TK, w_in_GDF, w_out_GFD, *,
                    num_experts, capacity, rows, ffn):
  plan = dispatch.plan_capacity(expert_TK, mask_TK, num_experts, capacity, rows)
  x_ECD = dispatch.dispatch_capacity(x_TD, plan)
  # Expert e's rows go to the device holding it; it stacks its sources along C.
  x_GRD = jax.lax.all_to_all(x_ECD, EXPERT_AXIS, 0, 1, tiled=True)
  y_GRD = ffn(x_GRD, w_in_GDF, w_out_GFD)
  y_ECD = jax.lax.all_to_all(y_GRD, EXPERT_AXIS, 1, 0, tiled=True)
  return dispatch.combine_capacity(y_ECD, plan, weight_TK), plan.kept_TK


def _dropless_local(x_TD, expert_TK, weight_TK, mask_TK, w_in_GDF, w_out_GFD, *,
                    num_experts, rows, recv_rows, grouped, exchange):
  n = jax.lax.axis_size(EXPERT_AXIS)
  groups = num_experts // n
  a2a = functools.partial(jax.lax.all_to_all, axis_name=EXPERT_AXIS,
                          split_axis=0, concat_axis=0, tiled=True)
  plan = dispatch.plan_dropless(expert_TK, mask_TK, num_experts, rows)
  x_MD = dispatch.dispatch_sorted(x_TD, plan)
  count_E = plan.group_sizes_E
  start_E = jnp.cumsum(count_E) - count_E
  recv_NG = a2a(count_E.reshape(n, groups))  # [source, local expert]
  total_G = jnp.sum(recv_NG, axis=0)
  # Owner layout: local expert major, then source, so each expert's rows are
  # contiguous for the grouped matmul.
  at_NG = (jnp.cumsum(total_G) - total_G)[None, :] + (
      jnp.cumsum(recv_NG, axis=0) - recv_NG)
  land_NG = a2a(at_NG)  # Where my slices land on each owner.
  x_RD = exchange(x_MD, jnp.zeros((recv_rows, x_MD.shape[1]), x_MD.dtype),
                  start_E, count_E, land_NG.reshape(-1), recv_NG.reshape(-1))
  y_RD = grouped(x_RD, w_in_GDF, w_out_GFD, total_G)
  origin_NG = a2a(start_E.reshape(n, groups))  # Where received slices came from.
  y_MD = exchange(y_RD, jnp.zeros(x_MD.shape, y_RD.dtype), at_NG.reshape(-1),
                  recv_NG.reshape(-1), origin_NG.reshape(-1), count_E)
  return dispatch.combine_sorted(y_MD, plan, weight_TK, mask_TK)


def check_mesh(mesh: jax.sharding.Mesh, num_tokens: int, num_experts: int
               ) -> tuple[int, int]:
  """(N, devices splitting the tokens); ConfigError when the shapes do not fit."""
  if tuple(mesh.axis_names) != MESH_AXES:
    raise ConfigError(
        f"expert parallelism needs a mesh with axes {MESH_AXES}, got "
        f"{tuple(mesh.axis_names)}; build it with moejax.parallel.make_mesh")
  n_expert = mesh.shape[EXPERT_AXIS]
  shards = 1
  for axis in TOKEN_AXES:
    shards *= mesh.shape[axis]
  if num_experts % n_expert:
    raise ConfigError(
        f"model.num_experts={num_experts} is not divisible by mesh.expert="
        f"{n_expert}; use a mesh.expert that divides the number of experts")
  if num_tokens % shards:
    raise ConfigError(
        f"{num_tokens} tokens (batch x length) do not split over {shards} "
        f"devices; make the batch size a multiple of {shards}")
  return n_expert, shards


def expert_parallel_ffn(
    x_TD: jax.Array, routing: Routing, w_in_EDF: jax.Array, w_out_EFD: jax.Array,
    *, mesh: jax.sharding.Mesh, dispatch_path: str = "capacity",
    capacity_factor: float = 1.25,
    activation: Callable[[jax.Array], jax.Array] = nn.gelu,
    ragged_dot: Callable[..., jax.Array] = jax.lax.ragged_dot,
    exchange: str | None = None, rows: int | None = None
    ) -> tuple[jax.Array, jax.Array]:
  """Routed experts of T tokens on `mesh`: returns (y [T, D], kept bool[T, K]).

  Checks the path and the mesh, then runs `expert_parallel_at` with
  C = `local_capacity(T / devices, E, K, capacity_factor,
  routing.slots.per_expert)`.
  """
  if dispatch_path not in dispatch.DISPATCH_PATHS:
    raise ConfigError(
        f"unknown dispatch {dispatch_path!r}; valid: "
        f"{', '.join(dispatch.DISPATCH_PATHS)}")
  num_tokens, _ = x_TD.shape
  num_experts = w_in_EDF.shape[0]
  _, shards = check_mesh(mesh, num_tokens, num_experts)
  capacity = local_capacity(num_tokens // shards, num_experts,
                            routing.expert_TK.shape[1], capacity_factor,
                            routing.slots.per_expert)
  return expert_parallel_at(
      x_TD, routing, w_in_EDF, w_out_EFD, mesh=mesh, path=dispatch_path,
      capacity=capacity, activation=activation, ragged_dot=ragged_dot,
      exchange=exchange, rows=rows)


def expert_parallel_at(
    x_TD: jax.Array, routing: Routing, w_in_EDF: jax.Array, w_out_EFD: jax.Array,
    *, mesh: jax.sharding.Mesh, path: str, capacity: int,
    activation: Callable[[jax.Array], jax.Array] = nn.gelu,
    ragged_dot: Callable[..., jax.Array] = jax.lax.ragged_dot,
    exchange: str | None = None, rows: int | None = None
    ) -> tuple[jax.Array, jax.Array]:
  """`expert_parallel_ffn` on a checked mesh and path, with C given.

  The expert maths is `moejax.moe.experts`' (`capacity_ffn`, `grouped_ffn` with
  `ragged_dot` as its grouped matmul) on each device's G experts. `exchange`
  picks the dropless transport: `ragged` or `dense` (default by backend, see
  `default_exchange`). `rows` is a device's allocation (`moejax.moe.budgets`):
  buffer rows per expert (capacity; default C) or sorted rows (dropless;
  default T * K, T a device's tokens); it must hold what every device uses.
  """
  num_tokens, _ = x_TD.shape
  num_experts = w_in_EDF.shape[0]
  _, top_k = routing.expert_TK.shape
  n_expert = mesh.shape[EXPERT_AXIS]
  tokens = num_tokens // math.prod(mesh.shape[axis] for axis in TOKEN_AXES)
  tok, by_expert = P(TOKEN_AXES), P(EXPERT_AXIS)
  # check_vma=False: Pallas grouped-matmul kernels declare no varying axes on
  # their outputs. Every output is split over all devices, and the gradients of
  # the weights (replicated over `data`) are still summed over `data` (tested).
  args = (x_TD, routing.expert_TK, routing.weight_TK, routing.mask_TK,
          w_in_EDF, w_out_EFD)
  # Expert weights enter whole per local expert (P("expert")) whatever their
  # stored layout: under `mesh.shard_params` they rest split over `data` too,
  # and XLA all-gathers them over `data` here (the grouped matmul needs whole
  # [G, D, F] either way); their gradients leave summed over `data` and are
  # sliced back to the stored layout. So the rules alone say the layout.
  in_specs = (tok,) * 4 + (by_expert,) * 2
  if path == "capacity":
    body = functools.partial(
        _capacity_local, num_experts=num_experts, capacity=capacity,
        rows=rows, ffn=functools.partial(capacity_ffn, activation=activation))
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, check_vma=False,
                         out_specs=(tok, tok))(*args)
  exchange = exchange or default_exchange()
  send_rows = tokens * min(top_k, num_experts // n_expert)
  if rows is not None:
    send_rows = min(send_rows, rows)
  if exchange == "ragged":
    transport = functools.partial(jax.lax.ragged_all_to_all, axis_name=EXPERT_AXIS)
  elif exchange == "dense":
    transport = functools.partial(dense_ragged_all_to_all, axis_name=EXPERT_AXIS,
                                  chunk_rows=send_rows)
  else:
    raise ConfigError(
        f"unknown exchange {exchange!r}; valid: {', '.join(EXCHANGES)}")
  body = functools.partial(
      _dropless_local, num_experts=num_experts, rows=rows,
      recv_rows=n_expert * send_rows,
      grouped=functools.partial(grouped_ffn, activation=activation,
                                ragged_dot=ragged_dot),
      exchange=transport)
  y_TD = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=tok,
                       check_vma=False)(*args)
  return y_TD, routing.mask_TK
