"""Translation quickstart: the quickstart's model as an encoder-decoder
(`model.arch=encdec`: 4 encoder and 4 decoder blocks, D=128, Switch top-1 with
8 experts in blocks 1 and 3 of each stack) trained on English -> Spanish verse
pairs of two public-domain Bibles (`data.task=seq2seq`: packed rows of 64
source + 64 target tokens, a joint SentencePiece vocabulary of 4000), label
smoothing 0.1, on a 2-core CPU.

The pairs come from Debian's SWORD packages (never needed by the package or
its tests):

  apt-get install -y libsword-utils sword-text-kjv sword-text-sparv
  python experiments/bible_pairs.py --out data/bible
  moejax-train --config configs/translation_quickstart.py --workdir /tmp/moejax-mt
  moejax-eval --workdir /tmp/moejax-mt
  moejax-translate --workdir /tmp/moejax-mt --src data/bible/test/en.txt \\
      --ref data/bible/test/es.txt --max_sentences 200

Any other line-aligned pair of files trains the same way:
`--config.data.source=parallel:<source file>,<target file>`. A verse longer
than its row is cut, EOS kept (`data.overlong=truncate`).

Measured on the 2-core CPU (jax 0.10.2) while other jobs loaded it: 9 min 9 s
end to end (4 min 17 s of CPU time); held-out target-token loss 5.69 at step
100, 4.75 at step 600 (perplexity 296 -> 116); `moejax-translate` above: BLEU
1.4, chrF 11.8 on the first 200 test verses (beam 4, 83 s). Fluent-looking
Spanish verses loosely tied to their sources: 600 steps (a third of an epoch)
are far from a translating model; the scores are there to compare methods and
budgets (experiments/README.md, "Translation").
"""

from moejax.train.presets import method_config

SOURCE = "parallel:data/bible/en.txt,data/bible/es.txt"


def get_config():
  c = method_config("switch", steps=600)
  c.model.arch = "encdec"
  c.data.task = "seq2seq"
  c.data.source = SOURCE
  c.data.seq_len = c.data.target_len = 64
  c.data.vocab_size = 4000
  c.data.overlong = "truncate"
  c.train.label_smoothing = 0.1
  return c
