"""Usage: python gate_entropy.py <comparison workdir> <method> [<method> ...]

Entropy of each MoE layer's gate distribution on held-out tokens at the final
checkpoint: softmax(logits / tau) at tau = 1 (what the report's entropy column
measures) and at the DTS gate's final temperature (the distribution it routes by)."""
import glob
import json
import math
import sys

import jax, jax.numpy as jnp, numpy as np
from moejax.train.trained import load_trained
from moejax.data import load_datasets

def entropy(logits, tau):
  p = jax.nn.softmax(logits / tau, -1)
  return float(jnp.mean(-jnp.sum(p * jnp.log(p + 1e-20), -1)))

out = {}
root = sys.argv[1]
for method in sys.argv[2:]:
  for wd in sorted(glob.glob(f"{root}/{method}/*/seed_*")):
    t = load_trained(wd)
    data = load_datasets(t.config.data, workdir=t.workdir, batch_size=t.config.train.batch_size)
    tau = dict(t.model_config.moe.router_options).get("tau_min", 1.0)
    rows = {1.0: [], tau: []}
    for batch in data.eval_batches[:4]:
      _, inter = t.model.apply(t.variables, batch["inputs"], deterministic=True,
                               capture_intermediates=lambda m, n: m.name in ("gate", "router"),
                               mutable=["intermediates"])
      flat = jax.tree_util.tree_flatten_with_path(inter["intermediates"])[0]
      for path, leaf in flat:
        if "gate" in jax.tree_util.keystr(path) and leaf.shape[-1] == t.model_config.moe.num_experts:
          for tt in rows: rows[tt].append(entropy(leaf.reshape(-1, leaf.shape[-1]).astype(jnp.float32), tt))
    E = t.model_config.moe.num_experts
    out[wd] = {f"tau={tt:g}": float(np.mean(v)) / math.log(E) for tt, v in rows.items() if v}
    print(wd, out[wd], flush=True)
json.dump(out, open(f"{root}/gate_entropy.json", "w"), indent=1)
