"""`moejax-finetune --workdir DIR [--steps N] [--lr X] [--batch_size B] [--seed S]`:
fine-tunes a masked-LM run as a classifier of which domain a window of text
comes from, and reports held-out accuracy beside the majority-class baseline.

Loads checkpoint --step (default: the newest) of a `model.arch=encoder` run,
puts a classification head on its encoder (mean pooling, one dense layer) and
trains both on the unmasked windows of the run's data source, or of another
multi-domain one given with --config.data.<key>=... (tokenized with the run's
tokenizer), labelled by domain. Writes <workdir>/finetune/<source>-<step>.json;
checkpoints and metrics are not touched.
"""

import json
import sys

from absl import flags

from moejax import cli_config

_CONFIG = cli_config.define_config_flag(
    "The run's config (default: <workdir>/config.json); override keys with "
    "--config.<key>=<value>, e.g. --config.data.source=text:a.txt,b.txt.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A masked-LM run's directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
_STEPS = flags.DEFINE_integer("steps", 300, "Fine-tuning steps.")
_LR = flags.DEFINE_float("lr", 3e-4, "Peak AdamW learning rate.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Windows per step (default: the run's train.batch_size).")
_SEED = flags.DEFINE_integer("seed", 0, "Head init, router noise, window order.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.01, "AdamW weight decay.")
_EVAL_BATCHES = flags.DEFINE_integer(
    "eval_batches", 16, "Held-out batches scored per split.")

_SHOWN = ("step", "source", "classes", "steps", "eval/accuracy", "eval/baseline",
          "eval/loss", "test/accuracy", "test/baseline", "test/loss")


def _main(argv) -> None:
  del argv
  from moejax.errors import MoejaxError  # pylint: disable=g-import-not-at-top
  from moejax.finetune import FinetuneConfig, finetune, write_result  # pylint: disable=g-import-not-at-top
  try:
    options = FinetuneConfig(
        steps=_STEPS.value, learning_rate=_LR.value,
        batch_size=_BATCH_SIZE.value, seed=_SEED.value,
        weight_decay=_WEIGHT_DECAY.value, eval_batches=_EVAL_BATCHES.value)
    options.validate()
    trained = cli_config.load_run(
        _CONFIG, _WORKDIR.value, _STEP.value,
        "moejax-finetune --workdir /tmp/moejax-mlm --steps 300")
    result = finetune(trained, options, trained.config.data,
                      log=lambda line: print(line, flush=True))
    path = write_result(trained, result)
  except MoejaxError as e:
    sys.exit(f"moejax: error: {e}")
  print(json.dumps({k: result[k] for k in _SHOWN if k in result}))
  print(f"wrote {path}")


def main() -> None:
  """Console entry point."""
  cli_config.run(_main, __name__, on_trained_run=True)


if __name__ == "__main__":
  main()
