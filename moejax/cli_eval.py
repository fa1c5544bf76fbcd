"""`moejax-eval --workdir DIR [--step N] [--config.data.source=...]`: held-out
loss, perplexity and router metrics of a checkpoint.

Scores checkpoint --step (default: the newest) on the held-out split of the
run's data source, or of another one given with --config.data.<key>=...
(tokenized with the run's tokenizer), and writes the result to
<workdir>/eval/<source>-<step>.json. Checkpoints and metrics are not touched.
"""

import json
import sys

from absl import flags

from moejax import cli_config

_CONFIG = cli_config.define_config_flag(
    "The run's config (default: <workdir>/config.json); override keys with "
    "--config.<key>=<value>, e.g. --config.data.source=text:other.txt.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A run's directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")


def _main(argv) -> None:
  del argv
  from moejax.errors import MoejaxError  # pylint: disable=g-import-not-at-top
  from moejax.evaluate import evaluate, write_result  # pylint: disable=g-import-not-at-top
  try:
    trained = cli_config.load_run(
        _CONFIG, _WORKDIR.value, _STEP.value,
        "moejax-eval --workdir /tmp/run --config.data.source=embedded")
    result = evaluate(trained, trained.config.data)
    path = write_result(trained, result)
  except MoejaxError as e:
    sys.exit(f"moejax: error: {e}")
  shown = {k: v for k, v in result.items()
           if k in ("step", "source", "eval/loss", "eval/ppl", "router/load_cv",
                    "router/drop_frac")}
  print(json.dumps(shown))
  print(f"wrote {path}")


def main() -> None:
  """Console entry point."""
  cli_config.run(_main, __name__, on_trained_run=True)


if __name__ == "__main__":
  main()
