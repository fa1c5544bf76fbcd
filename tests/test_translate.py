"""`moejax.translate` and `moejax-translate` on a tiny encoder-decoder trained
here: batched, sorted and padded translation equals searching each source
alone; the scores are sacrebleu's on the written hypotheses; the command
writes only its two files; bad input is one line.

Whether a longer run learns a task (BLEU above an untrained model's) is
`experiments/translate_rot13.py` (minutes, not a test).
"""

import json
import pathlib

import numpy as np
import pytest
import sacrebleu

from moejax.data.parallel import ParallelCorpus
from moejax.errors import ConfigError, DataError
from moejax.models.search import beam_search, greedy_search
from moejax.models.decode import decoding_config
from moejax.models.encdec import make_model
from moejax.train import parse
from moejax.train.trained import load_trained
from moejax.translate import (BOS_ID, EOS_ID, Pair, file_pairs, run_pairs,
                              translate)
from tests.conftest import tiny_config
from tests.data.corpora import side_lines, snapshot, write_pair
from tests.test_commands import run
from tests.train.test_seq2seq import _seq2seq_config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A 20-step encoder-decoder (MoE blocks in both stacks) trained by
  `moejax-train` on 160 prose -> code line pairs."""
  tmp = tmp_path_factory.mktemp("translate")
  paths = write_pair(tmp / "pairs", *side_lines())
  config = _seq2seq_config(paths)
  config.train.probe_every = 0
  config.data.cache_dir = ""
  (tmp / "c.json").write_text(json.dumps(parse(config).to_json()))
  run("moejax.train", "--config", tmp / "c.json", "--workdir", tmp / "run")
  return tmp / "run"


@pytest.fixture(scope="module")
def trained(workdir):
  return load_trained(workdir)  # On the 8 devices: rows split over them.


def _alone(trained, source: str, beam: int) -> str:
  """The hypothesis of one source searched alone on one device: [1, S], its
  ids then padding (`tests/models/test_search.py`: padding changes nothing)."""
  S, T = trained.config.data.seq_len, trained.config.data.target_len  # pylint: disable=invalid-name
  ids = trained.tokenizer.encode(source)[:S - 1] + [EOS_ID]
  model = make_model(decoding_config(trained.model_config))
  args = dict(max_steps=T - 1, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=0)
  src, seg = np.zeros((2, 1, S), np.int32)
  src[0, :len(ids)], seg[0, :len(ids)] = ids, 1
  out = (greedy_search(model, trained.variables, src, seg, **args) if beam == 1
         else beam_search(model, trained.variables, src, seg, beam_size=beam,
                          alpha=0.6, **args)[0])
  row = [int(t) for t in np.asarray(out)[0]]
  return trained.tokenizer.decode(row[:row.index(EOS_ID)] if EOS_ID in row
                                  else row)


def test_batched_translation_equals_each_source_alone(trained):
  pairs = run_pairs(trained, "validation")
  assert len(pairs) == 20
  long = Pair(" ".join(p.source for p in pairs[:6]), "x")
  pairs = [long] + pairs[:10]  # 11 sources: batches of 8, sorted, padded.
  for beam in (1, 3):
    result = translate(trained, pairs=pairs, beam_size=beam, batch_size=8)
    assert result["cut_sources"] == 1 and result["sentences"] == 11
    assert result["references"] == [p.target for p in pairs]
    for i in (0, 4, 10):  # The cut source, and some from each batch.
      assert result["hypotheses"][i] == _alone(trained, pairs[i].source, beam)


def test_command_writes_scores_of_its_hypotheses_and_nothing_else(workdir):
  before = snapshot(workdir)
  out = run("moejax.cli_translate", "--workdir", workdir, "--beam", 2,
            "--max_sentences", 12).stdout.splitlines()
  shown = json.loads(out[0])
  path = pathlib.Path(out[1].removeprefix("wrote "))
  assert path.parent == workdir / "translate"
  after = snapshot(workdir)
  added = {k for k in after if k not in before}
  assert added == {f"translate/{path.name}", f"translate/{path.stem}.txt"}
  assert {k: after[k] for k in before} == before
  result = json.loads(path.read_text())
  assert {k: result[k] for k in shown} == shown
  assert (result["split"], result["beam"], result["sentences"]) == (
      "validation", 2, 12)
  data = load_trained(workdir).config.data
  refs = [p.target for p in ParallelCorpus(
      data.source, data.eval_fraction, data.test_fraction).pairs("validation")
          ][:12]
  hyps = path.with_suffix(".txt").read_text(encoding="utf-8").split("\n")
  assert hyps[-1] == "" and len(hyps) == 13
  assert result["bleu"] == sacrebleu.corpus_bleu(hyps[:-1], [refs]).score
  assert result["chrf"] == sacrebleu.corpus_chrf(hyps[:-1], [refs]).score
  assert result["bleu_signature"].startswith("nrefs:1|case:mixed")


def test_files_are_translated_like_the_same_pairs(trained, tmp_path):
  pairs = run_pairs(trained, "validation")[:5]
  src, ref = write_pair(tmp_path, [p.source for p in pairs],
                        [p.target for p in pairs])
  got = translate(trained, pairs=file_pairs(src, ref), beam_size=1,
                  source=f"parallel:{src},{ref}")
  want = translate(trained, pairs=pairs, beam_size=1)
  assert got["hypotheses"] == want["hypotheses"] and got["bleu"] == want["bleu"]
  assert got["split"] == "files"


def _error(*args) -> str:
  proc = run("moejax.cli_translate", *args, check=False)
  assert proc.returncode == 1, proc.stderr[-2000:]
  (line,) = proc.stderr.strip().splitlines()
  assert line.startswith("moejax: error: ")
  return line


def test_bad_input_is_one_line(workdir, trained, tmp_path):
  src, ref = write_pair(tmp_path, ["a", "b", "c"], ["x", "y"])
  assert "has 3 lines but" in _error("--workdir", workdir, "--src", src,
                                     "--ref", ref)
  lm = tmp_path / "lm"
  lm.mkdir()
  (lm / "config.json").write_text(json.dumps(parse(tiny_config()).to_json()))
  assert "needs an encoder-decoder" in _error("--workdir", lm)
  with pytest.raises(DataError, match="does not exist"):
    file_pairs(tmp_path / "missing.txt", ref)
  with pytest.raises(DataError, match="no test split"):
    run_pairs(trained, "test")
  with pytest.raises(ConfigError, match="beam_size"):
    translate(trained, beam_size=0)
  fresh = tmp_path / "fresh"
  fresh.mkdir()
  (fresh / "config.json").write_text((workdir / "config.json").read_text())
  assert "has no checkpoint yet" in _error("--workdir", fresh)
