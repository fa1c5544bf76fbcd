"""Each process reads only its rows: training batch i as global arrays on a mesh.

`place_rows(fetch, batch_size, sharding)` asks `fetch(rows)` (sorted positions
in the global batch) for the rows the devices of this process hold, and
builds every leaf as one global array of [batch_size, ...] split by `sharding`
(the batch dimension over devices); the rows of other processes are never read.
With `Datasets.train_rows` as `fetch`, the arrays equal the whole batch
`ds.train[i]` placed with `moejax.parallel.rules.shard_batch`.
"""

from collections.abc import Callable

import jax
import numpy as np


def process_rows(batch_size: int, sharding: jax.sharding.Sharding) -> np.ndarray:
  """The rows (sorted positions in a [batch_size, ...] batch) that this
  process's devices hold under `sharding`."""
  index_map = sharding.addressable_devices_indices_map((batch_size,))
  rows = {r for idx in index_map.values()
          for r in range(*idx[0].indices(batch_size))}
  return np.asarray(sorted(rows), np.int64)


def place_rows(fetch: Callable[[np.ndarray], dict[str, np.ndarray]],
               batch_size: int, sharding: jax.sharding.Sharding
               ) -> dict[str, jax.Array]:
  """Global arrays [batch_size, ...] on `sharding` from this process's rows."""
  rows = process_rows(batch_size, sharding)
  local = fetch(rows)
  where = {int(r): k for k, r in enumerate(rows)}

  def leaf(x: np.ndarray) -> jax.Array:
    def part(index):
      return x[[where[r] for r in range(*index[0].indices(batch_size))]]
    return jax.make_array_from_callback((batch_size,) + x.shape[1:], sharding,
                                        part)
  return {name: leaf(x) for name, x in local.items()}
