"""`moejax-train --config configs/<name>.py --workdir DIR [--config.a.b=value ...]`."""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: config, metrics, checkpoints, tokenizer.")


def _main(argv) -> None:
  del argv
  from moejax.errors import MoejaxError  # pylint: disable=g-import-not-at-top
  from moejax.parallel import hosts, maybe_initialize  # pylint: disable=g-import-not-at-top
  from moejax.train import parse, train_and_evaluate  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  if _CONFIG.value is None or _WORKDIR.value is None:
    sys.exit("moejax: error: --config and --workdir are required, e.g. "
             "moejax-train --config configs/quickstart.py --workdir /tmp/run")
  try:
    maybe_initialize()  # jax.distributed on multi-process launches.
    summary = train_and_evaluate(parse(_CONFIG.value), _WORKDIR.value)
  except MoejaxError as e:
    sys.exit(f"moejax: error: {e}")
  keys = ("step", "train/loss", "eval/loss", "eval/ppl")
  if hosts.is_writer():  # One summary line per run, not one per process.
      print("done: " + ", ".join(f"{k}={summary[k]:.4g}" for k in keys
                               if k in summary))


def main() -> None:
  """Console entry point."""
  app.run(_main)


if __name__ == "__main__":
  main()
