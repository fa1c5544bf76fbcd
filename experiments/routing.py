"""Top experts of the held-out evaluation tokens under a run's last checkpoint.

Shapes: B batch, L length, N held-out tokens.

The trainer's probe tokens are its first evaluation batch, a contiguous slice of
the held-out split that may hold a single domain; the whole evaluation set (all
`data.eval_batches` batches) spans every domain, so the expert-by-domain map is
computed on it. The result is cached in the workdir (`heldout_routes.npz`).
"""

import json
import pathlib

import jax
import numpy as np

from moejax.data import DataConfig, load_datasets
from moejax.models import make_model
from moejax.models.config import transformer_config_from_json
from moejax.train.checkpoint import restore_params
from moejax.train.inputs import apply_model, model_inputs

ROUTES_FILE = "heldout_routes.npz"


def heldout_routes(workdir: str | pathlib.Path
                   ) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
  """({layer: int[N] top expert}, int[N] domain ids, domain names); no layers for
  a dense model, nothing for seq2seq rows (their tokens have no domains)."""
  workdir = pathlib.Path(workdir)
  cache = workdir / ROUTES_FILE
  if cache.exists():
    with np.load(cache) as f:
      routes = {k[len("route_"):]: f[k] for k in f.files if k.startswith("route_")}
      return routes, f["domains"], [str(n) for n in f["domain_names"]]
  config = json.loads((workdir / "config.json").read_text())
  data = load_datasets(DataConfig(**config["data"]), workdir=workdir,
                       batch_size=config["train"]["batch_size"])
  model_config = transformer_config_from_json(config["model"])
  routes: dict[str, list[np.ndarray]] = {}
  if "domains" not in data.eval_batches[0]:
    return {}, np.zeros(0, np.int32), []
  if model_config.has_moe:
    model = make_model(model_config)
    params, model_state = restore_params(workdir / "checkpoints")
    variables = {"params": params, **model_state}
    route = jax.jit(lambda v, batch: apply_model(
        model, v, batch, deterministic=True)[1]["routes"])
    for batch in data.eval_batches:
      for layer, experts_N in jax.device_get(
          route(variables, model_inputs(batch))).items():
        routes.setdefault(layer, []).append(np.asarray(experts_N))
  out = {layer: np.concatenate(parts) for layer, parts in routes.items()}
  domains_N = np.concatenate([b["domains"].reshape(-1) for b in data.eval_batches])
  np.savez(cache, domains=domains_N, domain_names=np.asarray(data.domain_names),
           **{f"route_{k}": v for k, v in out.items()})
  return out, domains_N, list(data.domain_names)
