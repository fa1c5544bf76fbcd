"""`moejax-translate --workdir DIR [--step N] [--split validation|test]
[--src FILE --ref FILE] [--beam 4] [--alpha 0.6] [--max_sentences N]
[--batch_size 32]`: translations by a trained encoder-decoder, scored with
sacrebleu's BLEU and chrF.

Translates the held-out split of the run's own pairs (`--split`; `test` needs a
run trained with data.test_fraction > 0), or line i of --src for every i,
scored against line i of --ref, with checkpoint --step (default: the newest),
by beam search (--beam 1: greedy). Writes
<workdir>/translate/<source>-<split>-<step>.json (scores, sacrebleu
signatures, settings) and the hypotheses, one a line, as the .txt beside it;
nothing else in the workdir changes.
"""

import json
import sys

from absl import flags

from moejax import cli_config

_CONFIG = cli_config.define_config_flag(
    "The run's config (default: <workdir>/config.json); override keys with "
    "--config.<key>=<value>, e.g. --config.mesh.expert=8.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A run's directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
_SPLIT = flags.DEFINE_enum("split", "validation", ["validation", "test"],
                           "Held-out split of the run's pairs.")
_SRC = flags.DEFINE_string("src", None, "Source sentences, one a line (with "
                           "--ref; instead of --split).")
_REF = flags.DEFINE_string("ref", None, "Reference translations of --src, "
                           "line-aligned.")
_BEAM = flags.DEFINE_integer("beam", 4, "Beam size (1: greedy).")
_ALPHA = flags.DEFINE_float("alpha", 0.6, "Length penalty exponent (0: none).")
_MAX_SENTENCES = flags.DEFINE_integer("max_sentences", None,
                                      "Translate the first N pairs only.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Sources decoded together.")
_SHOWN = ("step", "source", "split", "sentences", "bleu", "chrf",
          "cut_sources", "beam", "alpha", "seconds")


def _main(argv) -> None:
  del argv
  from moejax.errors import ConfigError, MoejaxError  # pylint: disable=g-import-not-at-top
  from moejax.train import parse  # pylint: disable=g-import-not-at-top
  from moejax import translate as lib  # pylint: disable=g-import-not-at-top
  try:
    if (_SRC.value is None) != (_REF.value is None):
      raise ConfigError("give --src and --ref together (sources and their "
                        "references, one sentence a line)")
    if _WORKDIR.value is not None and _CONFIG.value is not None:
      lib.check_encdec(parse(cli_config.resolve(_CONFIG)), _WORKDIR.value)
    pairs = source = None
    if _SRC.value is not None:
      pairs = lib.file_pairs(_SRC.value, _REF.value)
      source = f"parallel:{_SRC.value},{_REF.value}"
    trained = cli_config.load_run(
        _CONFIG, _WORKDIR.value, _STEP.value,
        "moejax-translate --workdir /tmp/run --split validation")
    result = lib.translate(
        trained, pairs=pairs, source=source, split=_SPLIT.value,
        beam_size=_BEAM.value, alpha=_ALPHA.value,
        max_sentences=_MAX_SENTENCES.value, batch_size=_BATCH_SIZE.value)
    path = lib.write_result(trained, result)
  except MoejaxError as e:
    sys.exit(f"moejax: error: {e}")
  print(json.dumps({k: result[k] for k in _SHOWN}))
  print(f"wrote {path}")


def main() -> None:
  """Console entry point."""
  cli_config.run(_main, __name__, on_trained_run=True)


if __name__ == "__main__":
  main()
