"""`moejax-train --config configs/<name>.py --workdir DIR [--config.a.b=value ...]`.

--config also takes a run's config.json; --print_config prints the resolved
config and exits; --help lists every config key with its default.

Every failure ends in one line on stderr: bad flags and config keys (with the
key ml_collections suggests), a missing config file, and the run's own errors
(`moejax: error: ...`, exit 1). SIGTERM and SIGINT stop the run after the
current step with a checkpoint and one line saying how to resume (exit 0 after
SIGTERM, 130 after SIGINT).
"""

import json
import shlex
import sys

from absl import flags

from moejax import cli_config

_CONFIG = cli_config.define_config_flag(
    "Experiment config: configs/<name>.py[:arg], or a run's config.json.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: config, metrics, checkpoints, tokenizer.")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the resolved config (as config.json would "
    "hold it) and exit without training.")


def _main(argv) -> None:
  del argv
  from moejax.errors import Interrupted, MoejaxError  # pylint: disable=g-import-not-at-top
  from moejax.parallel import hosts, maybe_initialize  # pylint: disable=g-import-not-at-top
  from moejax.train import parse, train_and_evaluate  # pylint: disable=g-import-not-at-top
  cli_config.quiet_logs()
  if _CONFIG.value is None or (_WORKDIR.value is None and not _PRINT_CONFIG.value):
    sys.exit("moejax: error: --config and --workdir are required, e.g. "
             "moejax-train --config configs/quickstart.py --workdir /tmp/run")
  try:
    config = parse(cli_config.resolve(_CONFIG))
    if _PRINT_CONFIG.value:
      print(json.dumps(config.to_json(), indent=2))
      return
    maybe_initialize()  # jax.distributed on multi-process launches.
    summary = train_and_evaluate(config, cli_config.absolute(_WORKDIR.value))
  except Interrupted as e:  # Every process says why it exits (each host's log).
    command = shlex.join(["moejax-train", *sys.argv[1:]])
    print(f"moejax: {e}; resume with: {command}", file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  except MoejaxError as e:
    sys.exit(f"moejax: error: {e}")
  keys = ("step", "train/loss", "eval/loss", "eval/ppl")
  if hosts.is_writer():  # One summary line per run, not one per process.
      print("done: " + ", ".join(f"{k}={summary[k]:.4g}" for k in keys
                               if k in summary))


def main() -> None:
  """Console entry point."""
  cli_config.run(_main, __name__)


if __name__ == "__main__":
  main()
