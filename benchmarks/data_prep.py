"""Data preparation at corpus scale: peak RSS, wall time and MB/s, beside the limit.

Builds a corpus of `--size-mb` MB from the shared corpora (their lines shuffled,
the shuffled copy repeated, one domain), prepares it with `load_datasets` in a
fresh child process (a cold cache in a temporary dir), and reports the child's
peak RSS (`ru_maxrss`), wall time and MB/s of corpus text. The limit beside it:
SentencePiece's raw encode throughput with the tokenizer just trained, on a
sample of the same text, on every core (`num_threads` = the usable cores).

  python benchmarks/data_prep.py --size-mb 256 1024 --tmp /tmp
  python benchmarks/data_prep.py --size-mb 16          # a quick check

Targets (issue 25): peak RSS <= 1 GB at every size, flat in the corpus size;
preparation >= 70% of the raw encode throughput.
"""

import argparse
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = next((p for p in (REPO.parent / "shared" / "data",
                           REPO.parents[1] / "shared" / "data") if p.is_dir()),
              REPO.parent / "shared" / "data")

_PREPARE = """
import sys, time
from moejax.data import DataConfig, load_datasets
t = time.perf_counter()
cfg = DataConfig(source="text:" + sys.argv[1], max_bytes=None, cache_dir=sys.argv[2],
                 vocab_size=int(sys.argv[4]), seq_len=int(sys.argv[5]))
ds = load_datasets(cfg, workdir=sys.argv[3], batch_size=8)
print("RESULT", time.perf_counter() - t, ds.train_tokens, flush=True)
"""


def build_corpus(path: pathlib.Path, size: int, shared: pathlib.Path,
                 seed: int = 0) -> int:
  """Writes `size` bytes (cut at a line end) of shuffled shared-corpus lines."""
  lines = []
  for f in sorted(shared.glob("*.txt")):
    lines += f.read_bytes().splitlines(keepends=True)
  if not lines:
    raise SystemExit(f"no *.txt corpora under {shared}; pass --shared")
  rng = random.Random(seed)
  rng.shuffle(lines)
  block = b"".join(lines)
  written = 0
  with open(path, "wb") as out:
    while written < size:
      take = block[:size - written]
      if written + len(block) > size:
        take = take[:take.rfind(b"\n") + 1] or take
      out.write(take)
      written += len(take)
      if len(take) < len(block):
        break
  return written


def _sample_docs(corpus: pathlib.Path, sample_bytes: int) -> tuple[list[str], int]:
  """~50 KB documents (as the carve's runs are) from the start of `corpus`."""
  with open(corpus, "rb") as f:
    data = f.read(sample_bytes)
  data = data[:data.rfind(b"\n") + 1]
  lines = data.decode("utf-8").splitlines(keepends=True)
  step = 1000
  return ["".join(lines[i:i + step]) for i in range(0, len(lines), step)], len(data)


def raw_encode_mb_s(model: pathlib.Path, corpus: pathlib.Path,
                    sample_bytes: int, threads: int | None = None) -> float:
  """SentencePiece's encode MB/s on `sample_bytes` of `corpus` (every core)."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  sp = spm.SentencePieceProcessor(model_file=os.fspath(model))
  docs, size = _sample_docs(corpus, sample_bytes)
  t = time.perf_counter()
  sp.encode(docs, num_threads=threads or len(os.sched_getaffinity(0)))
  return size / (time.perf_counter() - t) / 1e6


def _encode_part(args) -> int:
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  model, docs = args
  sp = spm.SentencePieceProcessor(model_file=model)
  return sum(len(x) for x in sp.encode(docs, num_threads=1))


def pool_encode_mb_s(model: pathlib.Path, corpus: pathlib.Path,
                     sample_bytes: int) -> float:
  """The same encode over a process pool, one process per core (each one
  thread), the documents split in contiguous parts; start-up not counted."""
  import multiprocessing  # pylint: disable=g-import-not-at-top
  docs, size = _sample_docs(corpus, sample_bytes)
  cores = len(os.sched_getaffinity(0))
  parts = [docs[i::cores] for i in range(cores)]
  with multiprocessing.get_context("spawn").Pool(cores) as pool:
    pool.map(_encode_part, [(os.fspath(model), ["warm up"])] * cores)
    t = time.perf_counter()
    pool.map(_encode_part, [(os.fspath(model), p) for p in parts])
    return size / (time.perf_counter() - t) / 1e6


def prepare(corpus: pathlib.Path, tmp: pathlib.Path, vocab: int, seq_len: int):
  """(wall s, peak RSS bytes, train tokens, tokenizer path) of one cold preparation."""
  cache, work = tmp / "cache", tmp / "work"
  env = {**os.environ, "PYTHONPATH": os.fspath(REPO)}
  t = time.perf_counter()
  proc = subprocess.Popen(
      [sys.executable, "-c", _PREPARE, os.fspath(corpus), os.fspath(cache),
       os.fspath(work), str(vocab), str(seq_len)],
      env=env, stdout=subprocess.PIPE, text=True)
  out = proc.stdout.read()
  _, status, usage = os.wait4(proc.pid, 0)  # This child's own peak RSS.
  wall = time.perf_counter() - t
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode:
    raise SystemExit(f"preparation failed (exit {proc.returncode})")
  tokens = int(out.split("RESULT")[-1].split()[1])
  return wall, usage.ru_maxrss * 1024, tokens, work / "tokenizer.model"


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size-mb", type=float, nargs="+", default=[256.0])
  p.add_argument("--tmp", default=tempfile.gettempdir(),
                 help="where corpora and caches go (deleted after each size)")
  p.add_argument("--shared", default=os.fspath(SHARED))
  p.add_argument("--vocab", type=int, default=1024)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--encode-sample-mb", type=float, default=32.0)
  p.add_argument("--compare-encoders", action="store_true",
                 help="only time SentencePiece threads against a process pool")
  args = p.parse_args()
  if args.compare_encoders:
    compare_encoders(args)
    return
  cores = len(os.sched_getaffinity(0))
  print(f"| corpus | train tokens | wall | prep MB/s | raw encode MB/s ({cores} "
        "cores) | prep / raw | peak RSS |")
  print("|---|---|---|---|---|---|---|")
  for size_mb in args.size_mb:
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="moejax-data-prep-", dir=args.tmp))
    try:
      corpus = tmp / "big.txt"
      size = build_corpus(corpus, int(size_mb * 1e6), pathlib.Path(args.shared))
      wall, rss, tokens, model = prepare(corpus, tmp, args.vocab, args.seq_len)
      raw = raw_encode_mb_s(model, corpus, int(args.encode_sample_mb * 1e6))
      prep = size / wall / 1e6
      row = dict(size_mb=size / 1e6, train_tokens=tokens, wall_s=wall,
                 prep_mb_s=prep, raw_encode_mb_s=raw, peak_rss_mb=rss / 1e6)
      print(f"| {size / 1e6:,.0f} MB | {tokens / 1e6:,.1f}M | {wall:,.0f} s | "
            f"{prep:.2f} | {raw:.2f} | {prep / raw:.0%} | {rss / 1e6:,.0f} MB |",
            flush=True)
      print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)


def compare_encoders(args) -> None:
  """One thread, SentencePiece threads on every core, a process pool: MB/s."""
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="moejax-encode-", dir=args.tmp))
  try:
    corpus = tmp / "big.txt"
    build_corpus(corpus, int(args.encode_sample_mb * 1e6) + 8_000_000,
                 pathlib.Path(args.shared))
    small = tmp / "small.txt"
    build_corpus(small, 8_000_000, pathlib.Path(args.shared), seed=1)
    _, _, _, model = prepare(small, tmp, args.vocab, args.seq_len)
    sample = int(args.encode_sample_mb * 1e6)
    for _ in range(2):  # Alternated twice: the machine's load drifts.
      one = raw_encode_mb_s(model, corpus, sample, threads=1)
      threads = raw_encode_mb_s(model, corpus, sample)
      pool = pool_encode_mb_s(model, corpus, sample)
      print(f"encode MB/s: 1 thread {one:.2f}, SentencePiece threads "
            f"{threads:.2f}, process pool {pool:.2f} "
            f"({len(os.sched_getaffinity(0))} cores)", flush=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
