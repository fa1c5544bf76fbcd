"""Bad input: a one-line error naming the problem, and the workdir left as it was."""

import os
import pathlib
import subprocess
import sys

import pytest

from moejax.errors import ConfigError, DataError
from moejax.train import parse, train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _tree(workdir: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(workdir)): p.read_bytes()
          for p in sorted(workdir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("overrides,match", [
    ({"model__router": "nope"}, "unknown router 'nope'; valid routers: "),
    ({"model__top_k": 5}, "model.top_k=5 must be between 1 and model.num_experts=4"),
    ({"train__batch_size": 0}, "train.batch_size must be a positive integer, got 0"),
    ({"train__steps": -3}, "train.steps must be a positive integer"),
    ({"model__num_experts": 0}, "model.num_experts must be a positive integer"),
    ({"data__seq_len": 0}, "data.seq_len must be a positive integer"),
    ({"model__d_model": 33}, "model.d_model=33 is not divisible by model.num_heads"),
    ({"model__dispatch": "magic"}, "model.dispatch='magic' is not valid"),
    ({"model__moe_layers": "7"}, "model.moe_layers has indices \\[7\\] outside"),
    ({"optim__learning_rate": 0.0}, "optim.learning_rate must be > 0"),
])
def test_bad_config_values(tiny, overrides, match):
  with pytest.raises(ConfigError, match=match):
    parse(tiny(**overrides))


def _bad_corpus(tmp_path: pathlib.Path, kind: str) -> str:
  if kind == "missing":
    return f"text:{tmp_path}/nothing-here-*.txt"
  path = tmp_path / f"{kind}.txt"
  if kind == "empty":
    path.write_text("  \n\n")
  elif kind == "binary":
    path.write_bytes(b"real text first\n" + bytes(range(256)) * 4)
  elif kind == "latin1":
    path.write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1") * 50)
  elif kind == "tiny":
    path.write_text("A corpus of two short lines.\nToo small for one batch.\n")
  elif kind == "one_line":  # Plenty of text, but not one line break.
    path.write_text(" ".join(f"word{i % 97} and more text" for i in range(8000)))
  return f"text:{path}"


@pytest.mark.parametrize("kind,match", [
    ("missing", "matches no file"),
    ("empty", "empty"),
    ("binary", "not UTF-8 text|binary"),
    ("latin1", "not UTF-8"),
    ("tiny", "too small|batch"),
    ("one_line", r"the text of domain 'one_line' \([\d,]+ bytes\) has no line "
                 r"breaks, .+; break the text into lines"),
])
def test_bad_corpus_is_refused_and_workdir_untouched(tmp_path, tiny, kind, match):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine")
  config = parse(tiny(data__source=_bad_corpus(tmp_path, kind), data__vocab_size=300))
  with pytest.raises(DataError, match=match) as err:
    train_and_evaluate(config, workdir, verbose=False)
  assert "\n" not in str(err.value)
  assert (workdir / "notes.txt").read_text() == "mine"
  assert not (workdir / "config.json").exists()
  assert not (workdir / "tokenizer.model").exists()


def test_unknown_data_source(tmp_path, tiny):
  with pytest.raises(DataError, match="ftp://x"):
    train_and_evaluate(parse(tiny(data__source="ftp://x")), tmp_path / "run",
                       verbose=False)
  assert not (tmp_path / "run").exists()


def test_cli_prints_one_line_error(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.run(
      [sys.executable, "-m", "moejax.train", "--config",
       str(ROOT / "configs" / "quickstart.py"), "--workdir", str(tmp_path / "run"),
       "--config.model.router=nope"],
      capture_output=True, text=True, env=env, timeout=120, check=False)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert lines == [f"moejax: error: unknown router 'nope'; valid routers: "
                   f"{lines[0].split('valid routers: ')[1]}"], proc.stderr
  assert "switch" in lines[0] and "topk" in lines[0]
  assert not (tmp_path / "run").exists()


def test_sequences_too_short_to_train_are_refused(tmp_path, tiny):
  with pytest.raises(DataError, match=r"data.seq_len=1 is too short to train a "
                     r"language model: each token would see at most 0 "
                     r"token\(s\) of context; use data.seq_len >= 8"):
    train_and_evaluate(parse(tiny(data__seq_len=1)), tmp_path / "run",
                       verbose=False)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,message", [
    (["--config.train.stepz=5"],
     "moejax: error: unknown config key train.stepz (--config.train.stepz=5); "
     "did you mean train.steps?"),
    (["--config.trian.steps=5"],
     "moejax: error: unknown config key trian.steps (--config.trian.steps=5); "
     "did you mean train.steps?"),
    (["--config.train.steps=abc"],
     "moejax: error: flag --config.train.steps=abc: invalid literal for int() "
     "with base 10: 'abc'; see --helpshort"),
    (["--config", "configs/nothere.py"],
     "moejax: error: --config configs/nothere.py: no such file (cwd {cwd}); "
     "give an experiment file such as configs/quickstart.py or a run's "
     "config.json"),
], ids=["typo", "typo in section", "bad value", "missing file"])
def test_cli_flag_errors_are_one_line(tmp_path, args, message):
  workdir = tmp_path / "run"
  if "--config" not in args:
    args = ["--config", "configs/quickstart.py", *args]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.run(
      [sys.executable, "-m", "moejax.train", *args, "--workdir", str(workdir)],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
      check=False)
  assert proc.returncode == 1
  assert proc.stderr.splitlines() == [message.format(cwd=ROOT)], proc.stderr
  assert not proc.stdout
  assert not workdir.exists()
