"""Hash layers (Roller et al. 2021): a fixed token-id -> expert table, nothing learned.

Shapes: B batch, L length, T tokens, D model width, E experts, V vocabulary,
K top-k slots per token (1).

The table is an int32[V] variable in the Flax collection `constants` (not
`params`: it is never trained), which the trainer keeps in
`TrainState.model_state`. `set_hash_tables` swaps in another table;
`frequency_tables`, the router's init transform with `balance="frequency"`,
one balanced on the training corpus's token counts (the stage machine applies
it to a fresh state: `moejax.stages.plan`).
"""

from collections.abc import Mapping
import functools
import heapq
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.errors import ConfigError
from moejax.routing.contract import Router, Routing, TokenLayout

TABLE_COLLECTION = "constants"
TABLE_NAME = "hash_table"
BALANCE_MODES = ("random", "frequency")


def random_balanced_table(key: jax.Array, vocab_size: int,
                          num_experts: int) -> jax.Array:
  """int32[V]: a random permutation of arange(V) % E (each expert V/E token ids).

  Balanced over token ids, not over text: expert e's load is the summed count
  of its ids. For a stream of N tokens with id counts c_v, each load has mean
  N/E and standard deviation about sigma = sqrt((1/E)(1 - 1/E) sum_v c_v^2)
  (ids assigned near-independently); loads within N/E +- 4 sigma is the
  tolerance we test. Frequent ids make sigma large: prefer `frequency`.
  """
  ids_V = jnp.arange(vocab_size, dtype=jnp.int32) % num_experts
  return jax.random.permutation(key, ids_V)


def frequency_balanced_table(counts_V: np.ndarray, num_experts: int) -> np.ndarray:
  """int32[V]: ids by descending count, each to the currently lightest expert.

  Guarantee: on the counted stream, max load - min load <= max_v counts_V[v]
  (adding c to the lightest expert can raise the spread only up to c). Ids
  never seen (count 0) then go to the experts with the fewest ids, so unseen
  text is spread too.
  """
  counts_V = np.asarray(counts_V)
  if counts_V.ndim != 1 or num_experts < 1 or np.any(counts_V < 0):
    raise ConfigError(
        "frequency_balanced_table needs non-negative counts of shape [V] and "
        f"num_experts >= 1, got shape {counts_V.shape}, {num_experts} experts")
  table_V = np.zeros(counts_V.shape[0], np.int32)
  ids_E = np.zeros(num_experts, np.int64)
  heap = [(0, e) for e in range(num_experts)]  # (load, expert)
  order_V = np.argsort(-counts_V, kind="stable")
  for v in order_V[counts_V[order_V] > 0]:
    load, e = heapq.heappop(heap)
    table_V[v] = e
    ids_E[e] += 1
    heapq.heappush(heap, (load + int(counts_V[v]), e))
  heap = [(int(ids), e) for e, ids in enumerate(ids_E)]  # (ids, expert)
  heapq.heapify(heap)
  for v in order_V[counts_V[order_V] == 0]:
    ids, e = heapq.heappop(heap)
    table_V[v] = e
    heapq.heappush(heap, (ids + 1, e))
  return table_V


def table_from_tokens(token_ids: np.ndarray, vocab_size: int,
                      num_experts: int) -> np.ndarray:
  """Frequency-balanced int32[V] table from a sample of corpus token ids."""
  counts_V = np.bincount(np.asarray(token_ids).reshape(-1), minlength=vocab_size)
  if counts_V.shape[0] != vocab_size:
    raise ConfigError(
        f"token ids reach {counts_V.shape[0] - 1}, beyond vocab_size={vocab_size}")
  return frequency_balanced_table(counts_V, num_experts)


def set_hash_tables(model_state: Mapping, table_V) -> dict:
  """A copy of `model_state` with every hash router's table replaced by table_V.

  `model_state` holds the non-param collections (`TrainState.model_state`);
  everything but the tables is returned unchanged. Raises ConfigError when no
  table is found or its vocabulary size differs.
  """
  table_V = jnp.asarray(table_V, jnp.int32)
  found = []

  def replace(tree, in_constants):
    out = {}
    for key, value in tree.items():
      if isinstance(value, Mapping):
        out[key] = replace(value, in_constants or key == TABLE_COLLECTION)
      elif in_constants and key == TABLE_NAME:
        if value.shape != table_V.shape:
          raise ConfigError(
              f"hash table has shape {tuple(table_V.shape)} but the model's has "
              f"{tuple(value.shape)}; build it with the model's vocab_size")
        found.append(key)
        # A buffer per table: a train step donates its state, and one buffer
        # at two places of a donated tree is an error (or a crash).
        out[key] = jnp.array(table_V, copy=True)
      else:
        out[key] = value
    return out

  new_state = replace(model_state, False)
  if not found:
    raise ConfigError(
        f"model_state has no '{TABLE_COLLECTION}/.../{TABLE_NAME}'; is the "
        "router 'hash'?")
  return new_state


def frequency_tables(model_state: Mapping, token_counts_V, *,
                     num_experts: int) -> dict:
  """The init transform of `balance="frequency"`: `model_state` with every
  hash table balanced over E experts on the corpus's int[V] token counts."""
  return set_hash_tables(model_state, frequency_balanced_table(
      np.asarray(token_counts_V), num_experts))


class HashRouter(Router):
  """Expert = table[token id]; gate 1; no loss; the hidden state is not read.

  The table is drawn at init from the `params` rng: a random balanced table
  (`balance="random"`). With `balance="frequency"` init draws the same
  placeholder, which the router's init transform (`frequency_tables`) replaces
  before training. Token ids outside [0, V) are clipped.

  Attributes:
    balance: `random` or `frequency` (how the table is built; see above).
  """

  balance: str = "random"

  top1_only: ClassVar[bool] = True

  @classmethod
  def init_transform(cls, options: dict[str, Any], *, num_experts: int
                     ) -> Callable[[dict, np.ndarray], dict] | None:
    """`balance="frequency"`: `frequency_tables` for E = `num_experts`."""
    if options["balance"] != "frequency":
      return None
    return functools.partial(frequency_tables, num_experts=num_experts)

  def __post_init__(self):
    # The table's size, not an option: known when the router is built.
    if self.vocab_size < 1:
      raise ConfigError(
          "router 'hash' needs token ids and the vocabulary size; build it with "
          "make_router(..., vocab_size=V)")
    super().__post_init__()

  @classmethod
  def check_options(cls, options: dict[str, Any], *, num_experts: int,
                    top_k: int) -> None:
    super().check_options(options, num_experts=num_experts, top_k=top_k)
    if options["balance"] not in BALANCE_MODES:
      raise ConfigError(
          f"router 'hash' option balance={options['balance']!r}; valid: "
          f"{', '.join(BALANCE_MODES)}")

  @nn.compact
  def __call__(self, x_TD: jax.Array, *, token_ids_T: jax.Array | None = None,
               step: jax.Array | None = None,
               layout: TokenLayout | None = None,
               deterministic: bool = True) -> Routing:
    del step, layout, deterministic  # One table throughout.
    if token_ids_T is None:
      raise ConfigError(
          "router 'hash' needs token ids in the MoE layer; pass token_ids_BL")
    if not (self.is_initializing()
            or self.has_variable(TABLE_COLLECTION, TABLE_NAME)):
      raise ConfigError(
          f"router 'hash' has no table: apply with the '{TABLE_COLLECTION}' "
          "collection from init (TrainState.model_state), not params alone")
    table = self.variable(
        TABLE_COLLECTION, TABLE_NAME,
        lambda: random_balanced_table(self.make_rng("params"), self.vocab_size,
                                      self.num_experts))
    ids_T = jnp.clip(token_ids_T.reshape(-1), 0, self.vocab_size - 1)
    expert_TK = table.value[ids_T][:, None].astype(jnp.int32)
    num_tokens = x_TD.shape[0]
    return Routing(
        expert_TK=expert_TK,
        weight_TK=jnp.ones((num_tokens, 1), jnp.float32),
        mask_TK=jnp.ones((num_tokens, 1), jnp.bool_),
        aux_loss=jnp.zeros((), jnp.float32),
        metrics={})
