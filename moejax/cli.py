"""`moejax-train --config configs/<name>.py --workdir DIR [--config.a.b=value ...]`.

Every failure ends in one line on stderr: bad flags and config keys (with the
key ml_collections suggests), a missing config file, and the run's own errors
(`moejax: error: ...`, exit 1). SIGTERM and SIGINT stop the run after the
current step with a checkpoint and one line saying how to resume (exit 0 after
SIGTERM, 130 after SIGINT).
"""

import os
import re
import shlex
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: config, metrics, checkpoints, tokenizer.")


def _config_arg(argv: list[str]) -> str | None:
  """The value of --config in `argv` (without a `:<arg>` suffix)."""
  for i, arg in enumerate(argv):
    if arg in ("--config", "-config") and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith(("--config=", "-config=")):
      value = arg.split("=", 1)[1]
    else:
      continue
    return value.split(":", 1)[0]
  return None


def _unknown_key(error: BaseException, argv: list[str]) -> str | None:
  """`unknown config key ...` for an override naming a key that does not
  exist, with ml_collections' suggestion when it has one."""
  text = str(error).replace("\\n", "\n").replace("\\'", "'")
  match = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  wrong = match[2] if match else re.sub(r"""^['"\\]+|['"\\]+$""", "",
                                        text.splitlines()[0])
  for arg in argv:
    name = arg.lstrip("-").split("=", 1)[0]
    parts = name.split(".")
    if parts[0] == "config" and wrong in parts[1:]:
      key = ".".join(parts[1:])
      if match:
        hint = ".".join(match[1] if p == wrong else p for p in parts[1:])
        return f"unknown config key {key} ({arg}); did you mean {hint}?"
      return (f"unknown config key {key} ({arg}); every key and its default is "
              "in moejax.train.config.default_config()")
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every failure as one line."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"moejax: error: {' '.join(str(e).split())}; see --helpshort")
  except (AttributeError, KeyError) as e:
    message = _unknown_key(e, argv)
    if message is None:
      raise
    sys.exit(f"moejax: error: {message}")
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [""])[0]
    sys.exit(f"moejax: error: cannot load --config {_config_arg(argv)} "
             f"({type(e).__name__}: {first}); fix the config file")
  path = _config_arg(argv)
  if path is not None and not os.path.isfile(path):
    sys.exit(f"moejax: error: --config {path}: no such file (cwd {os.getcwd()}); "
             "give an experiment file such as configs/quickstart.py")
  return rest


def _main(argv) -> None:
  del argv
  from moejax.errors import Interrupted, MoejaxError  # pylint: disable=g-import-not-at-top
  from moejax.parallel import maybe_initialize  # pylint: disable=g-import-not-at-top
  from moejax.train import parse, train_and_evaluate  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  if _CONFIG.value is None or _WORKDIR.value is None:
    sys.exit("moejax: error: --config and --workdir are required, e.g. "
             "moejax-train --config configs/quickstart.py --workdir /tmp/run")
  try:
    maybe_initialize()  # jax.distributed on multi-process launches.
    summary = train_and_evaluate(parse(_CONFIG.value), _WORKDIR.value)
  except Interrupted as e:
    command = shlex.join(["moejax-train", *sys.argv[1:]])
    print(f"moejax: {e}; resume with: {command}", file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  except MoejaxError as e:
    sys.exit(f"moejax: error: {e}")
  keys = ("step", "train/loss", "eval/loss", "eval/ppl")
  print("done: " + ", ".join(f"{k}={summary[k]:.4g}" for k in keys if k in summary))


def main() -> None:
  """Console entry point."""
  app.run(_main, flags_parser=_parse_flags)


if __name__ == "__main__":
  main()
