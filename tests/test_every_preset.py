"""Every preset samples and evaluates: each `moejax.train.presets.METHODS`
entry and each experiment file of configs/ trains once, then `moejax-sample`'s
and `moejax-eval`'s library entries run on its workdir (`check_trained`).

The METHODS entries train once per test session, in the golden run
(`tests/train/test_golden.py`), which asserts their metrics and then calls
`check_trained` on the same workdir. A configs/ file trains there too when,
shrunk here to `model.size=tiny` for the fewest steps that save a checkpoint,
it is the same run as a method (every file is, today); a file that equals no
method trains here, in a subprocess on one CPU device as on a laptop (XLA:CPU
at optimisation level 0, which halves what these tiny runs spend their time on).

`python -m tests.test_every_preset NAME...` runs presets by name and prints one
JSON line per preset.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import traceback

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPT = "def main("
NEW_TOKENS = 4


def file_config(path: pathlib.Path):
  """`get_config()` of an experiment file (its default argument)."""
  spec = importlib.util.spec_from_file_location(f"_preset_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _shrunk(config):
  """`config` at model.size=tiny on a small corpus, batch 8 (a multiple of
  the presets' 4 micro-batches), with the fewest steps every stage accepts;
  no probes. ConfigError if no step count up to 8 parses."""
  from moejax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from moejax.train import parse  # pylint: disable=g-import-not-at-top
  config.model.size = "tiny"
  config.data.max_bytes, config.data.vocab_size = 150_000, 512
  config.data.seq_len, config.data.eval_batches = 32, 1
  config.train.batch_size, config.train.probe_every = 8, 0
  if config.data.task == "seq2seq":  # Translation: the tests' little pairs.
    config.data.source, config.data.target_len = _pairs_source(), 32
  for steps in range(1, 9):
    config.train.steps = config.train.eval_every = steps
    config.train.checkpoint_every = steps
    try:
      return parse(config)
    except ConfigError as e:
      error = e
  raise error


def _pairs_source() -> str:
  """`parallel:` over the tests' little line-aligned corpus (real stdlib
  text), written once to a fixed place so a shrunk config is the same run
  wherever it is parsed."""
  from tests.data.corpora import side_lines, source_of, write_pair  # pylint: disable=g-import-not-at-top
  folder = pathlib.Path(tempfile.gettempdir()) / "moejax-preset-pairs"
  if not (folder / "es.txt").exists():
    write_pair(folder, *side_lines())
  return source_of([folder / "en.txt", folder / "es.txt"])


def presets() -> dict[str, list[str]]:
  """{preset name: names of the presets it equals once shrunk}: the files of
  configs/ (`configs/<name>.py`) and METHODS (`method:<name>`), each
  distinct shrunk run once."""
  from moejax.train.presets import METHODS  # pylint: disable=g-import-not-at-top
  names = ([f"configs/{p.name}" for p in sorted((ROOT / "configs").glob("*.py"))]
           + [f"method:{m}" for m in METHODS])
  distinct: dict[str, list[str]] = {}
  seen: dict[str, str] = {}
  for name in names:
    key = json.dumps(run_config(name).to_json(), sort_keys=True, default=str)
    if key in seen:
      distinct[seen[key]].append(name)
    else:
      seen[key] = name
      distinct[name] = []
  return distinct


def run_config(name: str):
  """The shrunk RunConfig of preset `name` (`configs/<file>` or `method:<m>`)."""
  from moejax.train.presets import method_config  # pylint: disable=g-import-not-at-top
  if name.startswith("method:"):
    return _shrunk(method_config(name.split(":", 1)[1]))
  return _shrunk(file_config(ROOT / name))


def check_preset(name: str, workdir: pathlib.Path) -> dict[str, float]:
  """Trains preset `name` in `workdir`, then `check_trained`. Returns seconds
  per part."""
  from moejax.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
  config = run_config(name)
  start = time.perf_counter()
  train_and_evaluate(config, workdir, verbose=False)
  return {"train": time.perf_counter() - start,
          **check_trained(workdir, config.train.steps)}


def check_trained(workdir: pathlib.Path, steps: int) -> dict[str, float]:
  """Samples and evaluates the run trained `steps` steps in `workdir`;
  AssertionError where a result is wrong. Returns seconds per part."""
  from moejax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from moejax.models.decode import Decoder  # pylint: disable=g-import-not-at-top
  from moejax.sample import annotate, sample  # pylint: disable=g-import-not-at-top
  from moejax.train.trained import load_trained  # pylint: disable=g-import-not-at-top
  times, start = {}, time.perf_counter()
  trained = load_trained(workdir)  # What moejax-sample and moejax-eval load.
  assert trained.step == steps, trained.step
  arch = trained.model_config.arch
  if arch in ("encoder", "encdec"):  # Nothing to continue: one-line errors.
    try:
      sample(trained, PROMPT, max_new_tokens=NEW_TOKENS, seed=1)
    except ConfigError as e:
      said = "bidirectional" if arch == "encoder" else "moejax-translate"
      assert said in str(e) and "\n" not in str(e), e
    else:
      raise AssertionError(f"sampling an {arch} did not fail")
    return {**times, **_check_eval(trained, workdir)}
  # One device, as on a laptop: decoding routes one sequence, which a
  # training-only option (the aux loss's micro-batches) once refused.
  assert trained.mesh.size == 1, trained.mesh
  decoder = Decoder(trained.model_config, mesh=trained.mesh)
  first, again = (sample(trained, PROMPT, max_new_tokens=NEW_TOKENS, seed=1,
                         decoder=decoder)[0] for _ in range(2))
  assert first == again  # Same seed, same text and experts.
  # NEW_TOKENS after the prompt, fewer where one is EOS (the text stops there).
  assert first.prompt_tokens <= len(first.tokens) <= (
      first.prompt_tokens + NEW_TOKENS), first.tokens
  moe = trained.model_config.moe_layers
  assert sorted(first.experts) == sorted(f"layer_{i}" for i in moe)
  for layer, experts in first.experts.items():
    assert len(experts) == len(first.tokens), layer
    assert all(-1 <= e < trained.model_config.moe.num_experts
               for e in experts), (layer, experts)
  if moe:  # --show_experts
    shown = annotate(first, trained.tokenizer)
    assert shown.startswith(f"[layer_{min(moe)}: expert per token]"), shown
  times["sample"] = time.perf_counter() - start
  return {**times, **_check_eval(trained, workdir)}


def _check_eval(trained, workdir: pathlib.Path) -> dict[str, float]:
  """On the run's own data, moejax-eval reproduces the trainer's last
  eval/loss and writes its result file."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from moejax.evaluate import evaluate, source_key, write_result  # pylint: disable=g-import-not-at-top
  from moejax.metrics.writers import read_metrics  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  result = evaluate(trained, trained.config.data)
  write_result(trained, result)
  logged = [r["eval/loss"] for r in read_metrics(workdir) if "eval/loss" in r]
  np.testing.assert_allclose(result["eval/loss"], logged[-1], rtol=1e-5)
  key = source_key(trained.config.data.source)
  assert (workdir / "eval" / f"{key}-{trained.step}.json").is_file()
  return {"eval": time.perf_counter() - start}


def without_method() -> list[str]:
  """The presets (configs/ files) that, shrunk, equal no METHODS entry."""
  return [name for name, same in presets().items()
          if not any(n.startswith("method:") for n in [name, *same])]


def test_config_files_equal_to_no_method_train_samples_and_evaluate(tmp_path):
  names = without_method()
  if not names:
    pytest.skip("every configs/ file is a METHODS run once shrunk; those train, "
                "sample and evaluate in tests/train/test_golden.py")
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_backend_optimization_level=0"}  # One device.
  proc = subprocess.run(
      [sys.executable, "-m", "tests.test_every_preset", *names], cwd=tmp_path,
      capture_output=True, text=True, env=env, timeout=900)
  rows = [json.loads(line) for line in proc.stdout.splitlines()
          if line.startswith("{")]
  print("\n".join(json.dumps(r) for r in rows))
  failed = [f"{r['preset']}: {r['error']}" for r in rows if r["error"]]
  assert not failed, "\n\n".join(failed)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert [r["preset"] for r in rows] == names


def test_presets_cover_every_file_and_method():
  from moejax.train.presets import METHODS  # pylint: disable=g-import-not-at-top
  covered = {n for name, same in presets().items() for n in [name, *same]}
  assert covered == ({f"configs/{p.name}" for p in (ROOT / "configs").glob("*.py")}
                     | {f"method:{m}" for m in METHODS})


def main(names: list[str]) -> None:
  with tempfile.TemporaryDirectory(prefix="moejax-presets-") as root:
    for i, name in enumerate(names):
      start, error, times = time.perf_counter(), "", {}
      try:
        times = check_preset(name, pathlib.Path(root) / str(i))
      except Exception:  # pylint: disable=broad-except
        error = traceback.format_exc()[-3000:]
      print(json.dumps({"preset": name, "error": error,
                        "seconds": round(time.perf_counter() - start, 1),
                        **{k: round(v, 1) for k, v in times.items()}}),
            flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
