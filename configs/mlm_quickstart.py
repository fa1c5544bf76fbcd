"""Masked-LM quickstart: the quickstart's 4-block model as a bidirectional
encoder (`model.arch=encoder`, Switch top-1, 8 experts in blocks 1 and 3),
trained on BERT-style masked batches of the embedded corpus
(`data.task=mlm`: 15% of the tokens chosen, 80/10/10 mask/random/kept), on a
2-core CPU.

  moejax-train --config configs/mlm_quickstart.py --workdir /tmp/moejax-mlm
  moejax-eval --workdir /tmp/moejax-mlm
  moejax-finetune --workdir /tmp/moejax-mlm

The loss and `moejax-eval`'s eval/loss are the mean cross-entropy over the
masked positions (docs/data.md); there is nothing to sample from an encoder
(`moejax-sample` says so in one line).

Measured on the 2-core CPU (jax 0.10.2, lightly loaded): 2 min 32 s end to
end; held-out masked-token loss 5.84 at step 100, 5.44 at step 500 (perplexity
346 -> 230), which `moejax-eval` reproduces. `moejax-finetune` (defaults:
300 steps of 16 windows, lr 3e-4; 3 min 44 s) classifies held-out windows as
code or docs with accuracy 0.980 against a majority baseline of 0.891 (256
windows), and, given the three shared corpora as
`--config.data.source=text:tinyshakespeare.txt,wikitext2-valid.txt,linux-kernel.txt`
(tokenized with this run's tokenizer; 3 min 35 s), as drama, encyclopedia or
C with 0.992 against 0.480.
"""

from moejax.train.presets import method_config


def get_config():
  c = method_config("switch", steps=500)
  c.model.arch = "encoder"
  c.data.task = "mlm"
  return c
