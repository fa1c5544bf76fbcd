"""Held-out loss, perplexity and router metrics of a checkpoint, on any source.

Shapes: B batch, L length, V vocabulary, E experts.

`evaluate(trained, data=None)` scores the checkpoint in `trained`
(`moejax.train.trained.load_trained`) on the held-out batches of `data` (a
`DataConfig`; default the run's own, which reproduces the trainer's
`eval/loss`), tokenized with the run's tokenizer. `write_result` puts the
result beside the run, in `<workdir>/eval/<source>-<step>.json`; nothing else
in the workdir changes (data caches of a new source go under `data/`, as for
training). The `moejax-eval` command (`moejax.cli_eval`) does both.
"""

import dataclasses
import hashlib
import json
import math
import re
from typing import Any

from etils import epath
import jax
import numpy as np

from moejax.data.config import DataConfig
from moejax.parallel import hosts
from moejax.train.inputs import apply_model, model_inputs
from moejax.train.step import loss_sums, router_metrics
from moejax.train.trained import Trained, check_data

EVAL_DIR = "eval"


def source_key(source: str) -> str:
  """A file-name-safe key of `data.source`: `embedded`, `text_a.txt+b.txt-<hash>`
  (file names of a `text:` source), `tfds_<name>-<hash>`."""
  if re.fullmatch(r"[A-Za-z0-9._-]+", source):
    return source
  kind, _, rest = source.partition(":")
  names = "+".join(part.rstrip("/").rsplit("/", 1)[-1] for part in rest.split(","))
  slug = re.sub(r"[^A-Za-z0-9.+_-]+", "_", f"{kind}_{names}")[:48]
  return f"{slug}-{hashlib.sha256(source.encode()).hexdigest()[:8]}"


def _eval_step(model):

  def step(variables, batch):
    logits_BLV, aux = apply_model(model, variables, batch, deterministic=True)
    out = {**loss_sums(logits_BLV, batch), **router_metrics(aux["layers"])}
    out.update({f"router/{layer}/load": load_E
                for layer, load_E in aux["loads"].items()})
    return out

  return jax.jit(step)


def evaluate(trained: Trained, data: DataConfig | None = None) -> dict[str, Any]:
  """`eval/loss` (mean next-token nats; a masked LM's: over the masked
  positions), `eval/ppl` and the router metrics
  (means over batches of the trainer's `router/...` keys, with per-expert
  loads `router/layer_<i>/load`) on the held-out batches of `data`."""
  from moejax.data import load_datasets  # pylint: disable=g-import-not-at-top
  data = data or trained.config.data
  check_data(trained, data)
  datasets = load_datasets(data, workdir=trained.workdir,
                           batch_size=trained.config.train.batch_size)
  step = _eval_step(trained.model)
  totals, tokens = {}, 0
  for batch in datasets.eval_batches:
    out = jax.device_get(step(trained.variables, model_inputs(batch)))
    tokens += int(out["tokens"])
    for key, value in out.items():
      totals[key] = totals.get(key, 0) + np.asarray(value, np.float64)
  batches = len(datasets.eval_batches)
  correct = totals.pop("correct")
  loss = float(totals.pop("loss_sum") / totals.pop("tokens"))
  result = {"workdir": str(trained.workdir), "step": trained.step,
            "stage": trained.stage, "source": data.source, "split": "validation",
            "batches": batches, "tokens": tokens, "eval/loss": loss,
            "eval/ppl": math.exp(loss) if loss < 700 else float("inf"),
            "eval/accuracy": float(correct / tokens)}
  for key, total in sorted(totals.items()):
    mean = total / batches
    result[key] = mean.tolist() if mean.ndim else float(mean)
  result["data"] = dataclasses.asdict(data)
  return result


def write_result(trained: Trained, result: dict[str, Any]) -> epath.Path:
  """Writes `result` to `<workdir>/eval/<source key>-<step>.json` (process 0)."""
  path = (trained.workdir / EVAL_DIR
          / f"{source_key(result['source'])}-{result['step']}.json")
  if hosts.is_writer():
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
  return path
