"""A dense baseline: the quickstart decoder with every FFN dense.

  moejax-train --config configs/dense.py --workdir /tmp/moejax-dense

Its checkpoint is what `configs/upcycle.py:/tmp/moejax-dense` upcycles.
"""

from moejax.train.presets import method_config


def get_config():
  return method_config("dense", steps=500)
