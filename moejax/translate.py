"""Translations of held-out sources by a trained encoder-decoder, scored with
sacrebleu's BLEU and chrF.

Shapes: B batch (sources decoded together), L length (of the padded sources),
Y steps (target tokens generated).

`translate(trained, split="validation")` decodes the held-out pairs of the
run's own source (`parallel:` or a `tfds:` translation dataset; "test" needs
`data.test_fraction` > 0 at training time), or any `pairs` given (say, the
lines of two files, `file_pairs`). Each source is encoded with the run's
tokenizer followed by EOS, as the trainer packs it; one longer than the run's
source rows (`data.seq_len` = S) is cut to S tokens, EOS kept, and counted.
Sources are sorted by length and decoded B at a time, each batch padded to the
smallest power of two (at least 8, at most S) that holds its longest source
(segment 0 at the padding, so padding changes no hypothesis: tested), by beam
search (`moejax.models.search`; beam 1: greedy) for at most T - 1 steps
(T = `data.target_len`: BOS takes a position). Each hypothesis is cut at its
first EOS and detokenized; the hypotheses come back in the order of the
sources. `corpus_scores` is sacrebleu on them against the references.

`write_result` puts the json and the hypotheses (one a line) in
`<workdir>/translate/`; nothing else in the workdir changes. The
`moejax-translate` command (`moejax.cli_translate`) does both.
"""

import dataclasses
import json
import pathlib
import time
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from moejax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from moejax.errors import ConfigError, DataError
from moejax.evaluate import source_key
from moejax.models.decode import decoding_config
from moejax.models.encdec import make_model
from moejax.models.search import beam_search, greedy_search
from moejax.parallel import hosts
from moejax.parallel.rules import TOKEN_AXES, shard_batch
from moejax.train.trained import Trained

TRANSLATE_DIR = "translate"
SPLITS = ("validation", "test")
FILES_SPLIT = "files"  # The split name of pairs read from --src/--ref files.
MIN_WIDTH = 8  # Narrowest padded source batch.


@dataclasses.dataclass(frozen=True)
class Pair:
  """A source sentence and its reference translation."""
  source: str
  target: str


def run_pairs(trained: Trained, split: str) -> list[Pair]:
  """The held-out pairs of `split` of the run's own data source."""
  from moejax.data import parallel  # pylint: disable=g-import-not-at-top
  if split not in SPLITS:
    raise ConfigError(f"split={split!r} must be one of {', '.join(SPLITS)}")
  data = trained.config.data
  if split == "test" and not data.test_fraction:
    raise DataError(
        "this run has no test split (data.test_fraction=0 when it trained, and "
        "setting it now would move training pairs into it); use --split "
        "validation, or --src/--ref files")
  try:
    corpus = parallel.open_pairs(data)
  except DataError as e:
    raise DataError(f"{e}; or give --src and --ref files") from None
  return [Pair(p.source, p.target) for p in corpus.pairs(split)]


def _file_lines(path: str) -> list[str]:
  file = pathlib.Path(path)
  if not file.is_file():
    raise DataError(f"{path} does not exist; give a text file, one sentence a "
                    "line")
  try:
    text = file.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path} is not UTF-8 (byte offset {e.start}); convert it "
                    "to UTF-8") from None
  return [line.removesuffix("\r") for line in text.removesuffix("\n").split("\n")
          ] if text else []


def file_pairs(src: str, ref: str) -> list[Pair]:
  """Line i of `src` with line i of `ref` (both UTF-8, the same line count);
  pairs with a blank side are skipped, as in training data."""
  sources, refs = _file_lines(src), _file_lines(ref)
  if len(sources) != len(refs):
    raise DataError(f"{src} has {len(sources)} lines but {ref} has {len(refs)}; "
                    "line i of the references must translate line i of the "
                    "sources")
  pairs = [Pair(s, r) for s, r in zip(sources, refs) if s.strip() and r.strip()]
  if not pairs:
    raise DataError(f"{src} and {ref} hold no pair of non-blank lines")
  return pairs


def _width(length: int, cap: int) -> int:
  """The padded width of a batch whose longest source has `length` ids."""
  width = MIN_WIDTH
  while width < length:
    width *= 2
  return min(width, cap)


def _arch_error(arch: str, workdir) -> ConfigError:
  return ConfigError(f"{workdir} is a model.arch={arch!r} run; translation needs "
                     "an encoder-decoder (model.arch=encdec, data.task=seq2seq)")


def check_encdec(config, workdir) -> None:
  """A ConfigError unless the run of `config` (a RunConfig) is an
  encoder-decoder (checked before a checkpoint is restored)."""
  arch = config.stages[-1].model.arch
  if arch != "encdec":
    raise _arch_error(arch, workdir)


class Translator:
  """Jitted searches of one trained encoder-decoder (reused across calls)."""

  def __init__(self, trained: Trained):
    config = trained.model_config
    if config.arch != "encdec":
      raise _arch_error(config.arch, trained.workdir)
    mesh = trained.mesh if trained.mesh.size > 1 else None
    self.model = make_model(decoding_config(config), mesh=mesh)
    self.mesh, self.variables = mesh, trained.variables
    self.source_len = trained.config.data.seq_len
    self.max_steps = (trained.config.data.target_len or self.source_len) - 1
    self.row_multiple = 1 if mesh is None else int(
        np.prod([mesh.shape[a] for a in TOKEN_AXES]))

  def search(self, source_BL: np.ndarray, segments_BL: np.ndarray, *,
             beam_size: int, alpha: float) -> np.ndarray:
    """int32[B, Y] the best hypothesis of each row (B a multiple of
    `row_multiple`)."""
    if self.mesh is not None:
      source_BL, segments_BL = shard_batch((source_BL, segments_BL), self.mesh)
    ids = dict(max_steps=self.max_steps, bos_id=BOS_ID, eos_id=EOS_ID,
               pad_id=PAD_ID)
    if beam_size == 1:
      out_BY = greedy_search(self.model, self.variables, source_BL,
                             segments_BL, **ids)
    else:
      out_BY, _ = beam_search(self.model, self.variables, source_BL,
                              segments_BL, beam_size=beam_size, alpha=alpha,
                              **ids)
    return np.asarray(jax.device_get(out_BY))


def encode_sources(tokenizer, sources: Sequence[str], source_len: int
                   ) -> tuple[list[list[int]], int]:
  """(ids + EOS of each source, cut to `source_len` with EOS kept; how many
  were cut)."""
  encoded, cut = [], 0
  for ids in tokenizer.encode(list(sources)):
    if len(ids) + 1 > source_len:
      ids, cut = ids[:source_len - 1], cut + 1
    encoded.append(list(ids) + [EOS_ID])
  return encoded, cut


def hypothesis_ids(row_Y: Iterable[int]) -> list[int]:
  """A hypothesis's ids up to (without) its first EOS."""
  out = []
  for token in row_Y:
    if token == EOS_ID:
      break
    out.append(int(token))
  return out


def decode_all(translator: Translator, encoded: Sequence[Sequence[int]], *,
               beam_size: int, alpha: float, batch_size: int
               ) -> list[list[int]]:
  """The hypothesis ids of each encoded source, in their order."""
  if batch_size < 1:
    raise ConfigError(f"batch_size={batch_size} must be at least 1")
  multiple = translator.row_multiple
  rows = -(-min(batch_size, len(encoded)) // multiple) * multiple
  order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
  out: list[list[int]] = [[] for _ in encoded]
  for start in range(0, len(order), rows):
    chunk = order[start:start + rows]
    width = _width(len(encoded[chunk[0]]), translator.source_len)
    source_BL = np.full((rows, width), PAD_ID, np.int32)
    segments_BL = np.zeros((rows, width), np.int32)
    for r in range(rows):  # Rows past the chunk repeat its first source.
      ids = encoded[chunk[r] if r < len(chunk) else chunk[0]]
      source_BL[r, :len(ids)], segments_BL[r, :len(ids)] = ids, 1
    out_BY = translator.search(source_BL, segments_BL, beam_size=beam_size,
                               alpha=alpha)
    for r, i in enumerate(chunk):
      out[i] = hypothesis_ids(out_BY[r])
  return out


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]
                  ) -> dict[str, Any]:
  """sacrebleu's corpus BLEU and chrF (default settings) and their signatures."""
  import sacrebleu  # pylint: disable=g-import-not-at-top
  bleu, chrf = sacrebleu.BLEU(), sacrebleu.CHRF()
  refs = [list(references)]
  return {"bleu": bleu.corpus_score(list(hypotheses), refs).score,
          "chrf": chrf.corpus_score(list(hypotheses), refs).score,
          "bleu_signature": str(bleu.get_signature()),
          "chrf_signature": str(chrf.get_signature())}


def translate(trained: Trained, *, pairs: Sequence[Pair] | None = None,
              split: str = "validation", source: str | None = None,
              beam_size: int = 4, alpha: float = 0.6,
              max_sentences: int | None = None, batch_size: int = 32,
              translator: Translator | None = None) -> dict[str, Any]:
  """Translates the held-out `split` of the run's source (or `pairs`, named
  `source`, split "files") and scores the hypotheses: the result dict, its
  `hypotheses` and `references` in the order of the pairs.

  `max_sentences`: the first N pairs only. `translator` (of the same run)
  reuses compiled searches across calls.
  """
  start = time.perf_counter()
  translator = translator or Translator(trained)
  if beam_size < 1:
    raise ConfigError(f"beam_size={beam_size} must be at least 1")
  if max_sentences is not None and max_sentences < 1:
    raise ConfigError(f"max_sentences={max_sentences} must be at least 1")
  if pairs is None:
    pairs, source = run_pairs(trained, split), trained.config.data.source
  else:
    split, source = FILES_SPLIT, source or "pairs"
  pairs = list(pairs)[:max_sentences]
  if not pairs:
    raise DataError(f"the {split} split of {source} holds no pairs")
  encoded, cut = encode_sources(trained.tokenizer, [p.source for p in pairs],
                                translator.source_len)
  ids = decode_all(translator, encoded, beam_size=beam_size, alpha=alpha,
                   batch_size=batch_size)
  # One line each, as the hypotheses file holds them (a newline is a piece).
  hypotheses = [" ".join(trained.tokenizer.decode(h).splitlines()) for h in ids]
  references = [p.target for p in pairs]
  return {"workdir": str(trained.workdir), "step": trained.step,
          "source": source, "split": split, "sentences": len(pairs),
          **corpus_scores(hypotheses, references),
          "cut_sources": cut, "source_len": translator.source_len,
          "max_steps": translator.max_steps, "beam": beam_size, "alpha": alpha,
          "seconds": time.perf_counter() - start,
          "hypotheses": hypotheses, "references": references}


def result_path(trained: Trained, result: dict[str, Any]) -> epath.Path:
  """`<workdir>/translate/<source key>-<split>-<step>.json`."""
  return (trained.workdir / TRANSLATE_DIR / f"{source_key(result['source'])}-"
          f"{result['split']}-{result['step']}.json")


def write_result(trained: Trained, result: dict[str, Any]) -> epath.Path:
  """Writes the result (without its hypotheses and references) as json and
  the hypotheses, one a line, as the .txt beside it (process 0); the json's
  path."""
  path = result_path(trained, result)
  summary = {k: v for k, v in result.items()
             if k not in ("hypotheses", "references")}
  summary["hypotheses_file"] = path.with_suffix(".txt").name
  if hosts.is_writer():
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".txt").write_text(
        "".join(h + "\n" for h in result["hypotheses"]),
        encoding="utf-8")
    path.write_text(json.dumps(summary, indent=2) + "\n")
  return path
