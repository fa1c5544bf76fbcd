"""The paper configs (configs/paper/): each file's structure at full size is the
paper's (blocks, D, experts, MoE placement, expert depth, stages, tokens per
step as its docstring says), it keeps that structure at `model.size=tiny`, and
it trains there unchanged but for sizes, on a prepared `tfds:` dataset.

Cost: parsing is instant; training runs for the representative subset TRAINED
only (StableMoE's two stages with the freeze transform, the middle MoE block
of depth-3 experts; EvoMoE's dense stage, `diversify` and the DTS gate on
every other block), 10 steps each on one device in one subprocess: the other
files differ from these only in the router or the size, which the parse
checks cover.
"""

import ast
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

from moejax.data import sources
from moejax.train import parse
from tests.test_every_preset import file_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "configs" / "paper").glob("*.py"))
# Per size: blocks, D, experts, expert depth, the block after the middle one.
STABLEMOE_SIZES = {"base": (12, 768, 32, 3, 6), "large": (24, 1024, 64, 6, 12)}
TRAINED = ("stablemoe_lm_base", "evomoe_gpt_moe")
TINY_STEPS = 10  # The fewest that give StableMoE's 10% stage 1 a step.


def expected(stem: str) -> dict:
  """What the paper says of the config `stem`, at full size."""
  if stem.endswith("_mt"):  # Table 3: 6 + 6 blocks, MoE after block 3 of each.
    moe = () if stem == "dense_mt" else (3,)
    stages = ([("distill", 30_000, moe), ("frozen", 322_000, moe)]
              if stem == "stablemoe_mt" else [("train", 352_000, moe)])
    return dict(num_layers=6, d_model=512, experts=32, depth=1, stages=stages,
                encoder=(6, moe), tokens=512 * 256, steps=352_000)
  if stem.startswith("evomoe_gpt_moe"):
    moe = tuple(range(1, 12, 2))  # Every other FFN of 12 blocks.
    shape = dict(num_layers=12, d_model=768, experts=32, depth=1)
    stages = ([("dense", 15_000, ()), ("dts", 45_000, moe)]
              if stem == "evomoe_gpt_moe" else [("train", 60_000, moe)])
    return dict(shape, stages=stages, tokens=512 * 1024, steps=60_000)
  method, size = re.fullmatch(r"(\w+)_lm_(base|large)", stem).groups()
  layers, d, experts, depth, middle = STABLEMOE_SIZES[size]
  moe = () if method == "dense" else (middle,)
  stages = ([("distill", 6_000, moe), ("frozen", 54_000, moe)]
            if method == "stablemoe" else [("train", 60_000, moe)])
  return dict(num_layers=layers, d_model=d, experts=experts,
              depth=1 if method == "dense" else depth, stages=stages,
              tokens=512 * 1024, steps=60_000)


def docstring_number(path: pathlib.Path, label: str) -> int:
  """The number N of the line `<label>: N` in the file's docstring."""
  doc = ast.get_docstring(ast.parse(path.read_text())) or ""
  m = re.search(rf"{label}: ([\d,]+)", doc)
  assert m, f"{path.name}'s docstring states no '{label}: N'"
  return int(m[1].replace(",", ""))


def test_every_table_row_has_a_config():
  stems = {p.stem for p in PAPER}
  rows = {f"{m}_lm_{s}" for m in ("dense", "switch", "base_layer", "hash",
                                  "stablemoe") for s in ("base", "large")}
  mt = {f"{m}_mt" for m in ("dense", "switch", "base_layer", "hash",
                             "stablemoe")}
  assert stems == rows | mt | {"evomoe_gpt_moe", "evomoe_gpt_moe_switch"}


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_full_size_structure_is_the_papers(path):
  c = file_config(path)
  want = expected(path.stem)
  run = parse(c)
  assert [(s.name, s.steps, s.model.moe_layers) for s in run.stages] == (
      want["stages"])
  for stage in run.stages:
    m = stage.model
    assert (m.num_layers, m.d_model) == (want["num_layers"], want["d_model"])
    assert m.moe.num_experts == want["experts"]
    if m.moe_layers:
      assert m.moe.expert_depth == want["depth"]
    if "encoder" in want:
      assert (m.arch, m.encoder_depth, m.encoder_moe_layers) == (
          "encdec", *want["encoder"])
    # What a pod needs, as the docstring recommends (an encoder-decoder has
    # no scanned layout).
    assert (m.scan_layers, m.remat, m.dtype) == (
        m.arch != "encdec", "full", "bfloat16")
  assert run.mesh.expert == want["experts"]  # One expert per chip, up to E.
  tokens = run.train.batch_size * run.data.row_tokens
  assert tokens == docstring_number(path, "Tokens per step") == want["tokens"]
  assert run.train.steps == docstring_number(path, "Steps") == want["steps"]
  assert sources.parse_source(run.data.source).kind == "tfds"
  assert run.data.max_bytes is None  # The whole dataset.
  assert f"--config configs/paper/{path.name}" in path.read_text()


def tiny(path: pathlib.Path, **data):
  """The config of `path` at model.size=tiny, TINY_STEPS steps on one device,
  small data; everything else (placement, depth, experts, stages) as is."""
  c = file_config(path)
  c.model.size = "tiny"
  c.mesh.data = c.mesh.expert = 1
  c.data.max_bytes, c.data.vocab_size, c.data.seq_len = 150_000, 512, 32
  c.data.eval_batches = 1
  c.train.batch_size, c.train.steps, c.train.probe_every = 8, TINY_STEPS, 0
  c.train.eval_every = c.train.checkpoint_every = TINY_STEPS
  for key, value in data.items():
    c.data[key] = value
  return c


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_tiny_keeps_the_structure(path):
  full, small = parse(file_config(path)), parse(tiny(path))
  assert small.stages[0].model.num_layers == 2  # Tiny: 2 blocks, D = 64.
  assert [(s.name, s.transform) for s in small.stages] == [
      (s.name, s.transform) for s in full.stages]
  # Stage lengths keep their shares of the run (StableMoE 10%, EvoMoE 25%).
  for s, f in zip(small.stages, full.stages):
    assert s.steps == round(f.steps / full.train.steps * TINY_STEPS), s
  for s, f in zip(small.stages, full.stages):
    a, b = s.model, f.model
    # The same placement rule on 2 blocks: middle -> block 1, every_other -> 1.
    assert bool(a.moe_layers) == bool(b.moe_layers)
    assert all(i < 2 for i in a.moe_layers)
    assert (a.moe.num_experts, a.moe.expert_depth, a.moe.router,
            a.scan_layers, a.remat) == (b.moe.num_experts, b.moe.expert_depth,
                                        b.moe.router, b.scan_layers, b.remat)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """A prepared text TFDS dataset (`tfds:moejax_text`) of 150 KB of the
  embedded corpus, train and validation."""
  from moejax.data import documents, embedded, text_builder  # pylint: disable=g-import-not-at-top
  splits = documents.carve_splits(embedded.documents(150_000), 0.05, 0.0)
  data_dir = tmp_path_factory.mktemp("tfds")
  text_builder.prepare(lambda: splits, data_dir)
  return str(data_dir)


def train_tiny(stem: str, tfds_dir: str, workdir: pathlib.Path) -> dict:
  """Trains config `stem` shrunk by `tiny` on `tfds:moejax_text` in
  `tfds_dir`; its losses and last logged step."""
  from moejax.metrics.writers import read_metrics  # pylint: disable=g-import-not-at-top
  from moejax.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
  config = parse(tiny(ROOT / "configs" / "paper" / f"{stem}.py",
                      source="tfds:moejax_text", tfds_data_dir=tfds_dir))
  start = time.perf_counter()
  train_and_evaluate(config, workdir, verbose=False)
  rows = read_metrics(workdir)
  return dict(preset=stem, seconds=round(time.perf_counter() - start, 1),
              train=[r["train/loss"] for r in rows if "train/loss" in r],
              eval=[r["eval/loss"] for r in rows if "eval/loss" in r],
              last_step=max(r["step"] for r in rows))


def test_tiny_trains_on_a_tfds_source(tfds_dir, tmp_path):
  # A subprocess on one CPU device at XLA optimisation level 0, as
  # tests/test_every_preset.py runs presets: these runs are mostly compiling.
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_backend_optimization_level=0"}
  proc = subprocess.run(
      [sys.executable, "-m", "tests.test_paper_configs", tfds_dir,
       str(tmp_path), *TRAINED], cwd=tmp_path, capture_output=True, text=True,
      env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in proc.stdout.splitlines()
          if line.startswith("{")]
  print("\n".join(json.dumps(r) for r in rows))
  assert [r["preset"] for r in rows] == list(TRAINED)
  for r in rows:
    assert r["train"] and r["eval"], r
    assert all(map(math.isfinite, r["train"] + r["eval"])), r
    # Every stage trained: the last logged step is the run's last.
    assert r["last_step"] == TINY_STEPS, r


if __name__ == "__main__":
  for name in sys.argv[3:]:
    print(json.dumps(train_tiny(name, sys.argv[1],
                                pathlib.Path(sys.argv[2]) / name)), flush=True)
