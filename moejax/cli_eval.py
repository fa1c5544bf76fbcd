"""`moejax-eval --workdir DIR [--step N] [--config.data.source=...]`: held-out
loss, perplexity and router metrics of a checkpoint.

Scores checkpoint --step (default: the newest) on the held-out split of the
run's data source, or of another one given with --config.data.<key>=...
(tokenized with the run's tokenizer), and writes the result to
<workdir>/eval/<source>-<step>.json. Checkpoints and metrics are not touched.
"""

import json
import sys

from absl import app
from absl import flags
from absl import logging

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
  from moejax.train import parse  # pylint: disable=g-import-not-at-top
  from moejax.train.trained import load_trained  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if _WORKDIR.value is None:
    sys.exit("moejax: error: --workdir is required, e.g. moejax-eval --workdir "
             "/tmp/run --config.data.source=embedded")
  try:
    config = parse(cli_config.resolve(_CONFIG))
    trained = load_trained(_WORKDIR.value, step=_STEP.value, config=config)
    result = evaluate(trained, config.data)
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
  cli_config.print_help_if_asked(__doc__, sys.modules[__name__])
  cli_config.default_to_run_config()
  app.run(_main)


if __name__ == "__main__":
  main()
