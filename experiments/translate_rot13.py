"""Does a small encoder-decoder learn a translation task? BLEU and chrF of a
trained run against the same model untrained, on held-out pairs.

The task: English prose from the Python docs (`pydoc_data`, present wherever
Python is), cut into lines of at most `--width` characters, translated into
its ROT13 (each letter moved 13 places): a deterministic character map that a
held-out line can only be translated by learning. The tokenizer is nearly
character-level (`--vocab 340`: the byte and character pieces and a few
merges), so the map is token to token.

  python experiments/translate_rot13.py --workdir /tmp/rot13 [--steps 1000]

trains (or resumes) the run with `moejax-train`'s library entry, translates
the validation pairs with `moejax.translate` (greedy and beam 4), and the same
with the model's initial params, prints one json line each, and exits 1 unless
the trained chrF and BLEU beat the untrained ones by `--margin` points.

Measured (defaults: 1,000 steps of D=64, 2 blocks, Switch over 4 experts in
block 1 of each stack; 66 validation lines; 2 min 45 s on a shared 2-core
CPU, one device): eval loss 0.38; BLEU 55.9 greedy, 56.6 beam 4; chrF 77.3,
80.5. Untrained: BLEU 0.09 and 0.07, chrF 1.5 and 1.3.
"""

import argparse
import codecs
import dataclasses
import json
import pathlib
import sys

MARGIN = 5.0


def lines(width: int, chars: int) -> list[str]:
  """The first `chars` characters of the docs' prose, as lines of at most
  `width` characters cut at spaces."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  words = "".join(v for _, v in sorted(topics.topics.items()))[:chars].split()
  out, line = [], ""
  for word in words:
    if line and len(line) + 1 + len(word) > width:
      out.append(line)
      line = word
    else:
      line = f"{line} {word}".strip()
  return out + [line] if line else out


def config(pairs: list[pathlib.Path], args):
  from moejax.train.config import default_config  # pylint: disable=g-import-not-at-top
  c = default_config()
  c.model.arch = "encdec"
  c.model.num_layers, c.model.d_model = 2, args.d_model
  c.model.num_heads, c.model.d_ff = 4, 2 * args.d_model
  c.model.num_experts = 4
  c.model.moe_layers = c.model.encoder_moe_layers = "1"
  c.data.task = "seq2seq"
  c.data.source = f"parallel:{pairs[0]},{pairs[1]}"
  c.data.seq_len = c.data.target_len = 32
  c.data.vocab_size, c.data.overlong = args.vocab, "truncate"
  c.data.eval_fraction, c.data.cache_dir = 0.125, ""
  c.train.steps, c.train.batch_size = args.steps, 16
  c.train.eval_every = c.train.checkpoint_every = args.steps
  c.train.log_every, c.train.probe_every = 100, 0
  c.optim.learning_rate, c.optim.warmup_steps = 3e-3, 50
  return c


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--d-model", type=int, default=64)
  parser.add_argument("--vocab", type=int, default=340)
  parser.add_argument("--width", type=int, default=24)
  parser.add_argument("--chars", type=int, default=12_000)
  parser.add_argument("--margin", type=float, default=MARGIN)
  args = parser.parse_args()
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from moejax.train import parse, train_and_evaluate  # pylint: disable=g-import-not-at-top
  from moejax.train.inputs import example_inputs  # pylint: disable=g-import-not-at-top
  from moejax.train.trained import load_trained  # pylint: disable=g-import-not-at-top
  from moejax.translate import Translator, translate  # pylint: disable=g-import-not-at-top

  root = pathlib.Path(args.workdir)
  src = lines(args.width, args.chars)
  pairs = [root / "pairs" / "en.txt", root / "pairs" / "rot13.txt"]
  pairs[0].parent.mkdir(parents=True, exist_ok=True)
  for path, side in zip(pairs, (src, [codecs.encode(l, "rot13") for l in src])):
    path.write_text("".join(l + "\n" for l in side), encoding="utf-8")
  summary = train_and_evaluate(parse(config(pairs, args)), root / "run",
                               verbose=False)
  trained = load_trained(root / "run")
  init = nn.unbox(jax.jit(Translator(trained).model.init)(
      jax.random.key(1), *example_inputs(trained.model_config, 8, 8)))
  runs = {"trained": trained,
          "untrained": dataclasses.replace(trained, variables=init)}
  scores = {}
  for name, run in runs.items():
    for beam in (1, 4):
      result = translate(run, beam_size=beam)
      scores[name, beam] = result
      print(json.dumps({"model": name,
                        "step": trained.step if name == "trained" else 0,
                        "eval/loss": summary["eval/loss"] if name == "trained"
                        else None,
                        **{k: result[k] for k in ("sentences", "beam", "bleu",
                                                  "chrf", "seconds")}}))
  ok = all(scores["trained", b][m] > scores["untrained", b][m] + args.margin
           for b in (1, 4) for m in ("chrf", "bleu"))
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
