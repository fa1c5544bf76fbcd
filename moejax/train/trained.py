"""A trained model from a run's workdir: its config, tokenizer and the variables
of one checkpoint step, restored read-only (nothing in the workdir changes).

`load_trained(workdir, step=None, config=None)` is what `moejax-sample`,
`moejax-eval` and the notebooks start from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import TYPE_CHECKING, Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from moejax.errors import CheckpointError, DataError
from moejax.models.config import TransformerConfig
from moejax.models.encdec import make_model
from moejax.parallel.mesh import make_mesh
from moejax.parallel.rules import axis_rules, logical_shardings, with_shardings
from moejax.train.config import RunConfig, parse
from moejax.train.config_io import config_from_json
from moejax.train.program import init_state
from moejax.train.optimizer import make_optimizer
from moejax.train.state import state_specs
from moejax.train.workdir import CONFIG_FILE

if TYPE_CHECKING:
  import sentencepiece as spm

_STAGE_DIR = re.compile(r"^stage_(\d+)$")


@dataclasses.dataclass(frozen=True, eq=False)
class Trained:
  """A checkpoint of a run, ready to apply.

  Attributes:
    workdir: the run's directory.
    config: the run's config (with any overrides the caller passed).
    stage: index of the stage that wrote the checkpoint.
    step: its global step.
    model_config: that stage's model.
    variables: params and the model's other collections (hash tables, ...),
      laid out on `mesh`.
    mesh: the (data, expert) mesh of `config.mesh`.
    tokenizer: the run's SentencePiece model.
  """

  workdir: epath.Path
  config: RunConfig
  stage: int
  step: int
  model_config: TransformerConfig
  variables: dict[str, Any]
  mesh: jax.sharding.Mesh
  tokenizer: spm.SentencePieceProcessor

  @property
  def model(self):
    """The model of the checkpoint's stage (expert-parallel on a mesh of > 1)."""
    return make_model(self.model_config,
                         mesh=self.mesh if self.mesh.size > 1 else None)


def check_data(trained: Trained, data) -> None:
  """A one-line DataError where `data` (a `DataConfig`) cannot feed the run's
  model: another vocabulary size, or windows (a seq2seq row's sides) longer
  than its max_len."""
  model_config = trained.model_config
  if data.vocab_size != model_config.vocab_size:
    raise DataError(f"data.vocab_size={data.vocab_size} but the run's tokenizer "
                    f"has {model_config.vocab_size}; keep the run's vocab_size")
  for key in ("seq_len", "target_len"):
    length = getattr(data, key)
    if length is not None and length > model_config.max_len:
      raise DataError(f"data.{key}={length} exceeds the model's max_len="
                      f"{model_config.max_len}; use at most "
                      f"{model_config.max_len}")


def run_config(workdir: str | os.PathLike) -> dict[str, Any]:
  """The resolved config a run wrote (`<workdir>/config.json`)."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise CheckpointError(f"{workdir} is not a moejax workdir (no {CONFIG_FILE}); "
                          "point --workdir at a run")
  return json.loads(path.read_text())


def checkpoint_steps(workdir: str | os.PathLike) -> dict[int, int]:
  """{global step: stage} of every checkpoint in the run, oldest first."""
  root = epath.Path(workdir) / "checkpoints"
  found = {}
  if root.exists():
    for stage_dir in root.iterdir():
      match = _STAGE_DIR.match(stage_dir.name)
      if not match:
        continue
      for step_dir in stage_dir.iterdir():
        if step_dir.name.isdigit() and (step_dir / "state").exists():
          # A later stage's checkpoint at a boundary step is the transformed one.
          found[int(step_dir.name)] = max(found.get(int(step_dir.name), -1),
                                          int(match[1]))
  return dict(sorted(found.items()))


def load_trained(workdir: str | os.PathLike, *, step: int | None = None,
                 config: RunConfig | None = None) -> Trained:
  """Restores checkpoint `step` (default: the newest) of the run in `workdir`.

  `config` replaces the run's own (say, another data source or mesh); its
  model must be the run's. CheckpointError names the steps there are.
  """
  from moejax.data.tokenizer import TOKENIZER_FILE, load_tokenizer  # pylint: disable=g-import-not-at-top
  workdir = epath.Path(workdir)
  if not workdir.is_absolute():
    workdir = workdir.absolute()  # Orbax reads absolute paths only.
  if config is None:
    config = parse(config_from_json(run_config(workdir)))
  steps = checkpoint_steps(workdir)
  if not steps:
    raise CheckpointError(f"{workdir} has no checkpoint yet; train first "
                          "(moejax-train ... --workdir it)")
  step = max(steps) if step is None else step
  if step not in steps:
    raise CheckpointError(f"{workdir} has no checkpoint at step {step}; steps "
                          f"saved: {', '.join(map(str, steps))}")
  stage = steps[step]
  model_config = config.stages[stage].model
  mesh = make_mesh(config.mesh, num_experts=model_config.moe.num_experts)
  model = make_model(model_config, mesh=mesh if mesh.size > 1 else None)
  tx = make_optimizer(config.optim, config.train.steps, config.stages[stage].frozen)
  lengths = config.data.seq_len, config.data.target_len
  abstract = jax.eval_shape(lambda: init_state(model, tx, jax.random.key(0),
                                               *lengths))
  shardings = logical_shardings(
      state_specs(model, tx, *lengths), abstract, mesh,
      axis_rules(config.mesh.shard_params))
  target = with_shardings(abstract, shardings)
  checkpointer = ocp.StandardCheckpointer()
  try:
    state = checkpointer.restore(
        workdir / "checkpoints" / f"stage_{stage}" / str(step) / "state", target)
  except (ValueError, KeyError, TypeError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CheckpointError(
        f"checkpoint {step} of {workdir} does not match the model of stage "
        f"{stage} ({first[:200]}); do not override model keys") from None
  finally:
    checkpointer.close()
  return Trained(workdir=workdir, config=config, stage=stage, step=step,
                 model_config=model_config, variables=state.variables(),
                 mesh=mesh,
                 tokenizer=load_tokenizer(workdir / TOKENIZER_FILE,
                                          config.data.vocab_size))
