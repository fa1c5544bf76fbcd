"""Routing trace and replay: record what the routers decided, force it later.

Shapes: T tokens, K top-k slots per token.

A trace of one MoE layer is `{"expert": int32[T, K], "weight": float32[T, K],
"mask": bool[T, K]}`, the `Routing` it used (`routing_trace`). Replay forces a
recorded trace in a later forward pass over the same tokens: the MoE layer
finds it in the Flax variable collection `replay` (under its own path, e.g.
`replay/block_1/moe/expert`) and dispatches the recorded slots with the
recorded weights instead of its router's (the router still runs, so its aux
loss and metrics are those of the live routing). Replaying the routes of an
earlier step on later experts separates what routing changes cost from what
expert changes bring (Megatron-core's router replay forces recorded top-k
indices the same way).
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax import layout
from moejax.pytree import nest
from moejax.routing.contract import Routing

REPLAY_COLLECTION = "replay"
TRACE_FIELDS = ("expert", "weight", "mask")
_DTYPES = {"expert": jnp.int32, "weight": jnp.float32, "mask": jnp.bool_}


def routing_trace(routing: Routing) -> dict[str, jax.Array]:
  """The record of one layer's routing (see the module docstring)."""
  return {"expert": routing.expert_TK, "weight": routing.weight_TK,
          "mask": routing.mask_TK}


def replay_routing(routing: Routing, recorded: Mapping[str, jax.Array]) -> Routing:
  """`routing` with its slots replaced by the recorded ones (any K, same T)."""
  num_tokens = routing.expert_TK.shape[0]
  shapes = {f: tuple(recorded[f].shape) for f in TRACE_FIELDS}
  if len(set(shapes.values())) != 1 or shapes["expert"][0] != num_tokens:
    raise ConfigError(
        f"replayed routes have shapes {shapes} but the layer routes {num_tokens}"
        " tokens; replay a trace recorded on the same tokens (the probe batch)")
  return routing.replace(**{f"{f}_TK": jnp.asarray(recorded[f], _DTYPES[f])
                            for f in TRACE_FIELDS})


def replay_variables(trace: Mapping[str, Mapping[str, jax.Array]]) -> dict:
  """The `replay` collection for `TransformerLM` from a trace by layer name,
  each layer's fields under its MoE layer's path (`moejax.layout`)."""
  flat = {}
  for layer, fields in trace.items():
    if set(fields) != set(TRACE_FIELDS):
      raise ConfigError(f"trace entry {layer!r} has fields {sorted(fields)}, "
                        f"not {', '.join(TRACE_FIELDS)}")
    path = layout.moe_path(layer)
    flat.update({f"{path}/{f}": jnp.asarray(fields[f], _DTYPES[f])
                 for f in TRACE_FIELDS})
  return {REPLAY_COLLECTION: nest(flat)}
