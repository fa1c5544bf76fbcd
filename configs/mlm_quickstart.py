"""Masked-LM quickstart: the quickstart's 4-block model as a bidirectional
encoder (`model.arch=encoder`, Switch top-1, 8 experts in blocks 1 and 3),
trained on BERT-style masked batches of the embedded corpus
(`data.task=mlm`: 15% of the tokens chosen, 80/10/10 mask/random/kept), on a
2-core CPU.

  moejax-train --config configs/mlm_quickstart.py --workdir /tmp/moejax-mlm
  moejax-eval --workdir /tmp/moejax-mlm

The loss and `moejax-eval`'s eval/loss are the mean cross-entropy over the
masked positions (docs/data.md); there is nothing to sample from an encoder.
"""

from moejax.train.presets import method_config


def get_config():
  c = method_config("switch", steps=500)
  c.model.arch = "encoder"
  c.data.task = "mlm"
  return c
