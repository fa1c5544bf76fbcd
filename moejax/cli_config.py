"""The `--config` flag shared by the moejax commands, and their `--help`.

`define_config_flag()` is ml_collections' config-file flag that also reads a
run's `config.json`, and accepts `--config.model.router_options.<name>=...` for
options the file does not set, and `None` for every key that may be None
(`nullable_paths()`). `resolve(flag)` applies the command line's one
rule beyond plain overrides: a router changed on the command line starts from
its own default options (the file's options belonged to the file's router),
keeping only options given in the same command.
"""

import functools
import os
import re
import sys
from typing import Any

from absl import flags
import ml_collections
from ml_collections import config_dict
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser
from ml_collections.config_flags.config_flags import _ConfigFlag as _FileFlag  # pylint: disable=g-importing-member

_OPTION = re.compile(r"^--?config\.model\.router_options\.(\w+)(=|$)")


def _option_types() -> dict[str, tuple[type, bool]]:
  """{router option: (type, whether it may be None)}, from the first router
  that has the option (its dataclass annotation)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from moejax.routing.registry import ROUTERS, router_options  # pylint: disable=g-import-not-at-top
  from moejax.train.config import optional_type  # pylint: disable=g-import-not-at-top
  types = {}
  for router, cls in ROUTERS.items():
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for name in router_options(router):
      base = optional_type(hints[name])
      types.setdefault(name, (hints[name], False) if base is None else (base, True))
  return types


def _option_type(name: str) -> type:
  """The type of router option `name` (str where no router has it: the router
  then rejects it with the list of valid options)."""
  return _option_types().get(name, (str, False))[0]


@functools.cache
def nullable_paths() -> tuple[str, ...]:
  """Every config key that may be None: `moejax.train.config.nullable_keys()`
  and `model.router_options.<name>` for options annotated `X | None`."""
  from moejax.train.config import nullable_keys  # pylint: disable=g-import-not-at-top
  return nullable_keys() + tuple(
      f"model.router_options.{name}" for name, (_, none) in _option_types().items()
      if none)


class _ConfigParser(ConfigFileFlagParser):
  """Loads `configs/*.py[:arg]` or a run's `config.json`; records the router the
  file chose, and makes room for router options named on the command line."""

  loaded_router: str | None = None

  def parse(self, path):
    if path.endswith(".json"):
      config = _json_config(path)
    else:
      config = super().parse(path)
    model = getattr(config, "model", None)
    if model is None or "router" not in model:
      return config
    self.loaded_router = model.router
    argv = flags.FLAGS.read_flags_from_files(sys.argv, force_gnu=False)
    with model.router_options.unlocked():
      for arg in argv:
        match = _OPTION.match(arg)
        if match and match[1] not in model.router_options:
          model.router_options[match[1]] = config_dict.placeholder(
              _option_type(match[1]))
    return config


def _json_config(path: str) -> ml_collections.ConfigDict:
  import json  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  from moejax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from moejax.train.config_io import config_from_json  # pylint: disable=g-import-not-at-top
  file = epath.Path(path)
  try:
    resolved = json.loads(file.read_text())
  except FileNotFoundError:
    raise ConfigError(f"--config {path} does not exist; pass configs/<name>.py "
                      "or a run's config.json") from None
  except json.JSONDecodeError as e:
    raise ConfigError(f"--config {path} is not valid JSON ({e})") from None
  config = config_from_json(resolved)
  config.lock()
  config.model.router_options.unlock()
  return config


class _NoneOr(flags.ArgumentParser):
  """`None` for a key that may be None; anything else goes to `parser`."""

  def __init__(self, parser: flags.ArgumentParser, path: str, allowed: bool):
    self.parser, self.path, self.allowed = parser, path, allowed

  def parse(self, argument):
    if argument == "None" and self.allowed:
      return None
    if argument == "None" and type(self.parser) is not flags.ArgumentParser:
      raise ValueError(f"{self.path} cannot be None (keys that can: "
                       f"{', '.join(nullable_paths())})")
    return self.parser.parse(argument)

  def flag_type(self):
    return self.parser.flag_type()


class _ConfigFlag(_FileFlag):
  """ml_collections' config-file flag whose overrides take `None` where the
  key may be None (`nullable_paths`)."""

  def _parse(self, argument):
    config = super()._parse(argument)
    prefix = f"{self.name}."
    for name in list(self.flag_values):
      flag = self.flag_values[name]
      if name.startswith(prefix) and not isinstance(flag.parser, _NoneOr):
        path = name[len(prefix):]
        key = re.sub(r"^stages\[\d+\]\.", "", path)  # A stage's model keys.
        flag.parser = _NoneOr(flag.parser, path, key in nullable_paths())
    return config


def define_config_flag(help_string: str) -> flags.FlagHolder:
  """`--config` (a configs/*.py file, `file.py:arg`, or a run's config.json)."""
  return flags.DEFINE_flag(_ConfigFlag(
      parser=_ConfigParser(name="config", lock_config=True),
      serializer=flags.ArgumentSerializer(), name="config", default=None,
      help_string=help_string), flags.FLAGS)


def resolve(holder: flags.FlagHolder) -> ml_collections.ConfigDict | None:
  """The config with command-line overrides, a changed router's options reset."""
  config = holder.value
  if config is None:
    return None
  overrides = config_flags.get_override_values(flags.FLAGS[holder.name])
  parser = flags.FLAGS[holder.name].parser
  loaded = getattr(parser, "loaded_router", None)
  if ("model.router" in overrides and config.model.router != loaded
      and "model.router_options" not in overrides):
    given = {k: v for k, v in config.model.router_options.items()
             if f"model.router_options.{k}" in overrides}
    config.model.router_options = ml_collections.ConfigDict(given)
  return config


def _value(value: Any) -> str:
  if isinstance(value, ml_collections.ConfigDict):
    return repr(value.to_dict()) if value else "{}"
  if isinstance(value, config_dict.FieldReference):
    value = value.get()
  return "None" if value is None else repr(value)


def config_help() -> str:
  """Every config key with its default, router options and size presets."""
  from moejax.models.sizes import SIZES  # pylint: disable=g-import-not-at-top
  from moejax.routing.registry import ROUTERS, router_options  # pylint: disable=g-import-not-at-top
  from moejax.train.config import default_config  # pylint: disable=g-import-not-at-top
  config = default_config()
  lines = ["config keys (override any with --config.<section>.<key>=<value>, "
           "=None where the default is None or says 'or None'; defaults from "
           "moejax.train.config.default_config()):"]
  for section, values in config.items():
    if not isinstance(values, ml_collections.ConfigDict):
      lines.append(f"  {section} = {_value(values)}")
      continue
    lines.append(f"  {section}:")
    lines += [f"    {key} = {_value(value)}"
              + (" (or None)" if f"{section}.{key}" in nullable_paths()
                 and value is not None else "")
              for key, value in values.items()]
  lines.append("router options (--config.model.router_options.<name>=<value>; a "
               "router changed on the command line starts from its defaults):")
  for name in ROUTERS:
    options = ", ".join(f"{k}={v!r}" for k, v in router_options(name).items())
    lines.append(f"  {name}: {options or '(none)'}")
  lines.append("size presets (--config.model.size=<name>: num_layers, d_model, "
               "num_heads, d_ff):")
  lines += [f"  {name}: {', '.join(f'{k}={v}' for k, v in shape.items())}"
            for name, shape in SIZES.items()]
  return "\n".join(lines)


def print_help_if_asked(usage: str, module) -> None:
  """For -h/--help: usage, this command's flags and every config key; exits."""
  if not {"-h", "--help", "-?", "--helpshort"} & set(sys.argv[1:]):
    return
  flags.FLAGS.mark_as_parsed()
  modules = (module, sys.modules[__name__])  # This one defines --config.
  print(usage.strip() + "\n\nflags:\n"
        + "\n".join(flags.FLAGS.module_help(m) for m in modules) + "\n\n"
        + config_help())
  sys.exit(0)


def default_to_run_config() -> None:
  """For commands on a trained run: without --config, `sys.argv` gets
  `--config=<workdir>/config.json` (so `--config.<key>=...` overrides it)."""
  argv = sys.argv
  if any(re.match(r"^--?config(=|$)", a) for a in argv[1:]):
    return
  workdir = None
  for i, arg in enumerate(argv[1:], 1):
    if re.match(r"^--?workdir=", arg):
      workdir = arg.split("=", 1)[1]
    elif re.match(r"^--?workdir$", arg) and i + 1 < len(argv):
      workdir = argv[i + 1]
  if workdir:
    sys.argv = [argv[0], f"--config={workdir.rstrip('/')}/config.json"] + argv[1:]


def quiet_logs() -> None:
  """absl logs at WARNING unless --verbosity is given (orbax logs every save)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def load_run(holder: flags.FlagHolder, workdir: str | None, step: int | None,
             example: str):
  """The checkpoint a command on a trained run works on (`Trained`), with the
  command line's config; exits with a usage line when --workdir is missing."""
  from moejax.train import parse  # pylint: disable=g-import-not-at-top
  from moejax.train.trained import load_trained  # pylint: disable=g-import-not-at-top
  quiet_logs()
  if workdir is None:
    sys.exit(f"moejax: error: --workdir is required, e.g. {example}")
  return load_trained(workdir, step=step, config=parse(resolve(holder)))


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


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every failure as one line."""
  path = _config_arg(argv)
  if path is not None and "://" not in path and not os.path.isfile(path):
    sys.exit(f"moejax: error: --config {path}: no such file (cwd {os.getcwd()}); "
             "give an experiment file such as configs/quickstart.py or a run's "
             "config.json")
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
  return rest


def run(main_fn, module_name: str, *, on_trained_run: bool = False) -> None:
  """Runs a command: its --help, the run's config.json as the default
  --config (for commands on a trained run), then absl with one-line flag
  errors."""
  from absl import app  # pylint: disable=g-import-not-at-top
  module = sys.modules[module_name]
  print_help_if_asked(module.__doc__, module)
  if on_trained_run:
    default_to_run_config()
  app.run(main_fn, flags_parser=parse_flags)


def absolute(workdir: str) -> str:
  """`workdir` made absolute (orbax refuses relative paths); URLs (gs://...)
  are kept."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path(workdir)
  return str(path if path.is_absolute() else path.absolute())
