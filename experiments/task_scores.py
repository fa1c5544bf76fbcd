"""A finished comparison run's own task scores, on the test split (the one that
neither training nor selection saw), cached in `<workdir>/task_scores.json`:

- translation (`data.task=seq2seq`): BLEU and chrF (sacrebleu) of beam-search
  translations of the test pairs (`moejax.translate`), written beside the run
  as `moejax-translate` writes them;
- masked LM (`data.task=mlm`): the held-out accuracy of the encoder fine-tuned
  as a domain classifier (`moejax.finetune`), and the majority-class
  accuracy, as `moejax-finetune` writes them.

Every run of a comparison is scored with the same options, so the methods are
treated alike; the cache is keyed by the checkpoint step and the options.
"""

import dataclasses
import json
import pathlib
from typing import Any

from experiments.summary import SCORES_FILE


@dataclasses.dataclass(frozen=True)
class ScoreOptions:
  """How every run of a comparison is scored."""

  beam_size: int = 4
  alpha: float = 0.6
  max_sentences: int | None = None  # Test pairs translated (None: all).
  finetune_steps: int = 300


def _translation(trained, options: ScoreOptions) -> dict[str, float]:
  from moejax import translate  # pylint: disable=g-import-not-at-top
  result = translate.translate(trained, split="test", beam_size=options.beam_size,
                               alpha=options.alpha,
                               max_sentences=options.max_sentences)
  translate.write_result(trained, result)
  return {"bleu": result["bleu"], "chrf": result["chrf"],
          "sentences": result["sentences"]}


def _mlm(trained, options: ScoreOptions) -> dict[str, float]:
  from moejax import finetune  # pylint: disable=g-import-not-at-top
  result = finetune.finetune(
      trained, finetune.FinetuneConfig(steps=options.finetune_steps,
                                       seed=trained.config.train.seed))
  finetune.write_result(trained, result)
  split = "test" if "test/accuracy" in result else "eval"
  return {"finetune_accuracy": result[f"{split}/accuracy"],
          "finetune_baseline": result[f"{split}/baseline"]}


SCORERS = {"seq2seq": _translation, "mlm": _mlm}


def score_run(workdir: str | pathlib.Path, options: ScoreOptions) -> dict[str, Any]:
  """The task scores of the run in `workdir` at its last checkpoint ({} for a
  language model, whose test PPL the summary already has)."""
  from moejax.train.trained import checkpoint_steps, load_trained  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir)
  task = json.loads((workdir / "config.json").read_text())["data"].get(
      "task", "lm")
  if task not in SCORERS:
    return {}
  # Keyed by the newest checkpoint, which is restored only to score anew.
  key = {"step": max(checkpoint_steps(workdir)),
         "options": dataclasses.asdict(options)}
  cache = workdir / SCORES_FILE
  if cache.exists():
    cached = json.loads(cache.read_text())
    if {k: cached.get(k) for k in key} == key:
      return cached["scores"]
  scores = SCORERS[task](load_trained(workdir, step=key["step"]), options)
  cache.write_text(json.dumps({**key, "scores": scores}) + "\n")
  return scores
