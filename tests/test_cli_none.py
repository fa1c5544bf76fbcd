"""`--config.<key>=None` on the command line, for every key whose type allows
None: the keys default_config() sets to None, the typed sections' fields
annotated `X | None` and router options annotated so."""

import dataclasses
import json
import typing

from ml_collections.config_flags import config_path

from moejax.cli_config import nullable_paths
from moejax.routing.registry import ROUTERS, router_options
from moejax.train import parse
from moejax.train.config import TYPED_SECTIONS, default_config
from tests.test_commands import ROOT, run
from tests.test_every_preset import file_config

QUICKSTART = ROOT / "configs" / "quickstart.py"
SAMPLE = {int: 96, str: "x", float: 0.5}  # A value of each type, not None.


def _allows_none(hint) -> bool:
  return type(None) in typing.get_args(hint)


def _expected_keys() -> set[str]:
  keys = {f"{section}.{key}" for section, values in default_config().items()
          if hasattr(values, "items") for key, value in values.items()
          if value is None}
  keys |= {f"{section}.{f.name}" for section, cls in TYPED_SECTIONS.items()
           for f in dataclasses.fields(cls) if _allows_none(f.type)}
  keys |= {f"model.router_options.{f.name}" for name, cls in ROUTERS.items()
           for f in dataclasses.fields(cls)
           if f.name in router_options(name) and _allows_none(f.type)}
  return keys


def _quickstart(**values):
  """configs/quickstart.py's config with `values` ({dotted key: value}) set."""
  config = file_config(QUICKSTART)
  for key, value in values.items():
    config_path.set_value(key, config, value)
  return config


def _resolved(config) -> dict:
  """`config` as --print_config prints it."""
  return json.loads(json.dumps(parse(config).to_json()))


def _print_config(*args) -> dict:
  return json.loads(run("moejax.train", "--config", *args, "--print_config").stdout)


def test_the_keys_that_may_be_none_are_derived_from_the_types():
  keys = set(nullable_paths())
  assert keys == _expected_keys()
  assert {k.split(".")[0] for k in keys} >= {"data", "model"}


def test_every_key_that_may_be_none_takes_none(tmp_path):
  keys = nullable_paths()
  plain = [k for k in keys if not k.startswith("model.router_options.")]
  options = [k.rsplit(".", 1)[1] for k in keys if k not in plain]
  # Each command changes to a router that has the options it sets to None.
  commands = {}
  for option in options:
    router = next(r for r in ROUTERS if option in router_options(r))
    commands.setdefault(router, []).append(option)
  commands = list(commands.items()) or [(None, [])]
  for i, (router, names) in enumerate(commands):
    given = (plain if i == 0 else []) + [f"model.router_options.{n}"
                                         for n in names]
    args = [f"--config.{key}=None" for key in given]
    expected = _quickstart(**{k: None for k in given
                              if not k.startswith("model.router_options.")})
    if router is not None:
      args.insert(0, f"--config.model.router={router}")
      expected.model.router = router
      expected.model.router_options = {n: None for n in names}
    resolved = _print_config(QUICKSTART, *args)
    assert resolved == _resolved(expected), args
    if i == 0:
      # A run's config.json with those None values: each takes a value again.
      path = tmp_path / "config.json"
      path.write_text(json.dumps(resolved))
      assert _print_config(path) == resolved
      values = {k: SAMPLE[config_path.get_type(k, default_config())]
                for k in plain}
      again = _print_config(path, *(f"--config.{k}={v}" for k, v in values.items()))
      for key, value in values.items():
        config_path.set_value(key, expected, value)
      assert again == _resolved(expected)


def test_none_for_a_key_that_cannot_be_none_is_one_clear_line():
  proc = run("moejax.train", "--config", QUICKSTART, "--print_config",
             "--config.train.steps=None", check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "moejax: error: flag --config.train.steps=None: train.steps cannot be "
      "None (keys that can: ")
