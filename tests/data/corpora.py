"""Tiny real corpora cut from the Python stdlib, a config sized for them, snapshots."""

import dataclasses
import hashlib
import inspect
import json.decoder
import pathlib
import textwrap

from moejax.data import DataConfig


def stdlib_texts() -> dict[str, str]:
  """Three small real texts, present wherever Python is: prose and two code files."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  prose = "".join(v for _, v in sorted(topics.topics.items()))
  return {
      "prose": prose[:prose.index("\n", 12_000) + 1],
      "wrap": inspect.getsource(textwrap),
      "json": inspect.getsource(json.decoder),
  }


def write_corpus(folder: pathlib.Path) -> list[pathlib.Path]:
  """Writes prose.txt, wrap.txt and json.txt (10-20 KB each) into `folder`."""
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for stem, text in stdlib_texts().items():
    path = folder / f"{stem}.txt"
    path.write_text(text, encoding="utf-8")
    paths.append(path)
  return paths


PAIRS = 160  # Pairs of the little parallel corpus.


def side_lines(n: int = PAIRS) -> tuple[list[str], list[str]]:
  """Two real texts of n non-blank lines each, line-aligned as a parallel
  corpus: English prose and Python code."""
  texts = stdlib_texts()
  src = [l for l in texts["prose"].splitlines() if l.strip()][:n]
  tgt = [l for l in texts["wrap"].splitlines() if l.strip()][:n]
  return src, tgt


def write_pair(folder: pathlib.Path, src: list[str], tgt: list[str],
               names=("en.txt", "es.txt")) -> list[pathlib.Path]:
  """Writes the two sides, one line each, into `folder`."""
  folder.mkdir(parents=True, exist_ok=True)
  paths = [folder / n for n in names]
  for path, lines in zip(paths, (src, tgt)):
    path.write_text("".join(l + "\n" for l in lines), encoding="utf-8")
  return paths


def source_of(paths) -> str:
  """The `parallel:` source of two side files."""
  return f"parallel:{paths[0]},{paths[1]}"


def small_config(source: str, **overrides) -> DataConfig:
  """A DataConfig sized for the tiny corpora: L=32, vocab 400, 1/4 held out, the
  data cache under the workdir (`cache_dir=""`)."""
  base = DataConfig(source=source, seq_len=32, vocab_size=400, eval_fraction=0.25,
                    max_bytes=None, eval_batches=2, seed=0,
                    tokenizer_max_sentences=5_000, cache_dir="")
  return dataclasses.replace(base, **overrides)


def snapshot(folder: pathlib.Path) -> dict[str, tuple[int, str]]:
  """(mtime_ns, sha256) of every file under `folder`, by relative path."""
  return {p.relative_to(folder).as_posix():
          (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
          for p in sorted(folder.rglob("*")) if p.is_file()}
