"""One process of a two-process run that places training batches from its own rows.

  python -m tests.multihost.rows_probe <corpus dir> <workdir> <out{}.json>

Joins the run (`JAX_*` variables, as `tests.multihost.launch` sets them), loads
the data (process 0 prepares), places batches 0..4 on a (data 2, expert 4) mesh
with `moejax.data.rows.place_rows`, gathers them, and writes which rows this
process read (into out{}.json, {} its index) and whether each gathered batch equals the whole `ds.train[i]`.
"""

import json
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from moejax.data import load_datasets
from moejax.data.rows import place_rows
from moejax.parallel import MeshConfig, batch_sharding, make_mesh, maybe_initialize
from tests.data.corpora import small_config

if __name__ == "__main__":
  corpus, workdir, out = sys.argv[1:4]
  maybe_initialize()
  ds = load_datasets(small_config(f"text:{corpus}/*.txt"), workdir=workdir,
                     batch_size=8)
  mesh = make_mesh(MeshConfig(data=2, expert=4), num_experts=4)
  read, equal = [], []
  for i in range(5):
    def fetch(rows, i=i):
      read.append([int(r) for r in rows])
      return ds.train_rows(i, rows)
    batch = place_rows(fetch, ds.batch_size, batch_sharding(mesh))
    whole = ds.train[i]
    equal.append(all(
        np.array_equal(multihost_utils.process_allgather(batch[k], tiled=True),
                       whole[k]) for k in whole))
  with open(out.format(jax.process_index()), "w") as f:
    json.dump({"process": jax.process_index(), "read": read, "equal": equal}, f)
