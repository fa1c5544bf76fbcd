"""Fine-tuning a masked-LM run as a sequence classifier of the domain a window
of text comes from: an offline labelled task on any multi-domain source.

Shapes: B batch, L length, O output width (of the classifier's head: one
logit per class, the source's domains).

`finetune(trained, options, data=None)` takes a `model.arch=encoder` run
(`moejax.train.trained.load_trained`), puts a `SequenceClassifier` head
(`moejax.models.classifier`: mean pooling, one dense layer) on its encoder and
trains the whole model with AdamW for `options.steps` steps on the unmasked
windows of `data` (default the run's own source; `data.task=lm` batches of the
same packed windows, tokenized with the run's tokenizer). The loss is the mean
cross-entropy of the labels plus the MoE aux losses, as in training; routers
see the stage step of the checkpoint. It returns held-out loss and accuracy on
the validation split (and the test split, when the source has one) beside the
majority-class baseline. `write_result` puts the result in
`<workdir>/finetune/<source>-<step>.json`; nothing else in the workdir changes
(data caches of a new source go under `data/`, as for training). The
`moejax-finetune` command (`moejax.cli_finetune`) does both.

Labels: a window's label is the majority domain of its L tokens (packed
windows are cut from each split's EOS-joined stream, so the window where one
document ends and the next begins may hold two domains; ties go to the lower
domain id). The baseline of a split is the accuracy of always answering its
most frequent label: the best any constant answer scores there.

Deterministic given `options.seed`: it draws the head, the routers' noise and
the order of the training windows (`data.seed` is replaced by it).
"""

import dataclasses
import json
import math
import time
from typing import Any, Callable

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax.data.config import DataConfig
from moejax.errors import ConfigError, DataError
from moejax.evaluate import source_key
from moejax.models.classifier import SequenceClassifier, classifier_variables
from moejax.parallel import hosts
from moejax.parallel.rules import shard_batch
from moejax.routing.contract import ROUTER_STATE
from moejax.stages.stage import boundaries
from moejax.train.trained import Trained, check_data

FINETUNE_DIR = "finetune"


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """How the classifier is trained and scored.

  Attributes:
    steps: optimizer steps.
    learning_rate: AdamW's peak rate (linear warmup over the first tenth of
      the steps, then cosine decay to 0).
    batch_size: windows per step (None: the run's `train.batch_size`).
    seed: draws the head, the routers' noise and the window order.
    weight_decay: AdamW's decoupled weight decay.
    eval_batches: held-out batches scored per split (of `batch_size` windows,
      spread over the split; fewer where the split is smaller).
  """

  steps: int = 300
  learning_rate: float = 3e-4
  batch_size: int | None = None
  seed: int = 0
  weight_decay: float = 0.01
  eval_batches: int = 16

  def validate(self) -> None:
    for name in ("steps", "eval_batches"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(self.learning_rate, (int, float))
            and math.isfinite(self.learning_rate) and self.learning_rate > 0):
      raise ConfigError(f"learning_rate must be positive, got "
                        f"{self.learning_rate!r}; e.g. 3e-4")
    if not (isinstance(self.weight_decay, (int, float))
            and self.weight_decay >= 0):
      raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")


def window_labels(domains_BL: np.ndarray, num_classes: int) -> np.ndarray:
  """int32[B]: the majority domain of each window (ties: the lower id)."""
  counts_BO = (np.asarray(domains_BL)[:, :, None]
               == np.arange(num_classes)).sum(axis=1)
  return counts_BO.argmax(axis=1).astype(np.int32)


def check_run(trained: Trained, data: DataConfig) -> None:
  """A one-line error for a run or source this cannot fine-tune."""
  model_config = trained.model_config
  if model_config.arch != "encoder":
    raise ConfigError(
        f"{trained.workdir} is a model.arch={model_config.arch!r} run; "
        "moejax-finetune fine-tunes an encoder (model.arch=encoder, "
        "data.task=mlm, e.g. configs/mlm_quickstart.py)")
  check_data(trained, data)


def _steps(model: SequenceClassifier, tx: optax.GradientTransformation,
           stage_step: int):
  """(jitted train step, jitted eval step). The train state is (params, other
  collections, optimizer state, step, rng): the seed is an argument, so every
  seed runs one compiled program."""
  stage_step = jnp.asarray(stage_step, jnp.int32)

  def loss_fn(params, model_state, batch, step_rng):
    (logits_BO, aux), updated = model.apply(
        {"params": params, **model_state}, batch["inputs"], deterministic=False,
        step=stage_step, rngs={"router": step_rng}, mutable=[ROUTER_STATE])
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits_BO, batch["labels"]))
    return ce + aux["aux_loss"], (ce, aux["aux_loss"], updated)

  def train_step(state, batch):
    params, model_state, opt_state, i, rng = state
    grads, (ce, aux_loss, updated) = jax.grad(loss_fn, has_aux=True)(
        params, model_state, batch, jax.random.fold_in(rng, i))
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return ((params, {**model_state, **updated}, opt_state, i + 1, rng),
            {"loss": ce, "aux_loss": aux_loss})

  def eval_step(variables, inputs_BL, labels_B):
    logits_BO, _ = model.apply(variables, inputs_BL, deterministic=True)
    ce_B = optax.softmax_cross_entropy_with_integer_labels(logits_BO, labels_B)
    return ce_B, jnp.argmax(logits_BO, axis=-1)

  return jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)


def _score(eval_step, variables, batches, num_classes: int) -> dict[str, Any]:
  """Loss, accuracy, baseline and label counts over `batches`."""
  ce, right, labels = [], [], []
  for batch in batches:
    labels_B = window_labels(batch["domains"], num_classes)
    ce_B, pred_B = jax.device_get(eval_step(variables, batch["inputs"], labels_B))
    ce.append(np.asarray(ce_B, np.float64))
    right.append(np.asarray(pred_B) == labels_B)
    labels.append(labels_B)
  labels = np.concatenate(labels)
  counts = np.bincount(labels, minlength=num_classes)
  return {"loss": float(np.concatenate(ce).mean()),
          "accuracy": float(np.concatenate(right).mean()),
          "baseline": float(counts.max() / counts.sum()),
          "examples": int(counts.sum()), "label_counts": counts.tolist()}


def finetune(trained: Trained, options: FinetuneConfig = FinetuneConfig(),
             data: DataConfig | None = None,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Fine-tunes the run's encoder with a classification head on the domains
  of `data` (default the run's source); the result dict (module docstring).
  `log` gets a progress line now and then."""
  from moejax.data import load_datasets  # pylint: disable=g-import-not-at-top
  options.validate()
  data = data or trained.config.data
  check_run(trained, data)
  batch_size = options.batch_size or trained.config.train.batch_size
  data = dataclasses.replace(data, task="lm", seed=options.seed,
                             eval_batches=options.eval_batches)
  datasets = load_datasets(data, workdir=trained.workdir, batch_size=batch_size)
  classes = datasets.domain_names
  if len(classes) < 2:
    raise DataError(
        f"data.source {data.source!r} has one domain ({classes[0]}); the "
        "classifier needs two or more: a text: source with one file per "
        "domain (text:a.txt,b.txt) or the embedded corpus")
  mesh = trained.mesh if trained.mesh.size > 1 else None
  model = SequenceClassifier(trained.model_config, len(classes), mesh=mesh)
  head_rng, step_rng = jax.random.split(jax.random.key(options.seed))
  variables = classifier_variables(trained.variables, head_rng,
                                   trained.model_config.d_model, len(classes))
  replicated = jax.sharding.NamedSharding(trained.mesh,
                                          jax.sharding.PartitionSpec())
  variables = jax.tree.map(
      lambda x: x if isinstance(x, jax.Array) and x.committed
      else jax.device_put(x, replicated), variables)
  params = variables.pop("params")
  warmup = max(1, options.steps // 10)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(
      0.0, options.learning_rate, warmup, max(options.steps, warmup + 1)),
                   weight_decay=options.weight_decay)
  stage_step = trained.step - boundaries(trained.config.stages)[trained.stage]
  train_step, eval_step = _steps(model, tx, stage_step)
  # A copy: the step donates its state, and the run's arrays stay usable.
  params, variables = jax.jit(lambda t: jax.tree.map(jnp.copy, t))(
      (params, variables))
  state = (params, variables, tx.init(params), jnp.zeros((), jnp.int32),
           step_rng)
  start, losses = time.perf_counter(), []
  for i in range(options.steps):
    batch = datasets.train[i]
    placed = {"inputs": batch["inputs"],
              "labels": window_labels(batch["domains"], len(classes))}
    if mesh is not None:
      placed = shard_batch(placed, trained.mesh)
    state, metrics = train_step(state, placed)
    losses.append(metrics["loss"])
    if log and ((i + 1) % max(1, options.steps // 5) == 0
                or i + 1 == options.steps):
      log(f"finetune step {i + 1}/{options.steps}: loss "
          f"{float(metrics['loss']):.4f}")
  train_losses = np.asarray(jax.device_get(losses), np.float64)
  train_time = time.perf_counter() - start
  params, model_state = state[:2]
  tuned = {"params": params, **model_state}
  result = {"workdir": str(trained.workdir), "step": trained.step,
            "stage": trained.stage, "source": data.source,
            "classes": list(classes), "pooling": "mean over non-padding tokens",
            "steps": options.steps, "train/loss": float(
                train_losses[-max(1, options.steps // 10):].mean()),
            "train/first_loss": float(train_losses[0]),
            "train/time_s": round(train_time, 3)}
  splits = {"eval": datasets.eval_batches, "test": datasets.test_batches}
  for split, batches in splits.items():
    if batches:
      scores = _score(eval_step, tuned, batches, len(classes))
      result.update({f"{split}/{k}": v for k, v in scores.items()})
  result["finetune"] = dataclasses.asdict(
      dataclasses.replace(options, batch_size=batch_size))
  result["data"] = dataclasses.asdict(data)
  return result


def result_path(trained: Trained, source: str) -> epath.Path:
  """`<workdir>/finetune/<source key>-<step>.json`."""
  return (trained.workdir / FINETUNE_DIR
          / f"{source_key(source)}-{trained.step}.json")


def write_result(trained: Trained, result: dict[str, Any]) -> epath.Path:
  """Writes `result` to `result_path` (process 0)."""
  path = result_path(trained, result["source"])
  if hosts.is_writer():
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
  return path
