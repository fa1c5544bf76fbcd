"""moejax: Mixture-of-Experts Transformers with stable routing, in JAX/Flax.

Import what you need from the subpackages (importing `moejax` alone is light):
  moejax.routing  routers behind one contract, their registry and losses
  moejax.moe      dispatch (capacity, dropless), stacked experts, the MoE layer
  moejax.models   the decoder-only Transformer LM
  moejax.train    config, the pure step, the loop, checkpoints
  moejax.data     corpora, the TFDS text builder, tokenizer, packing
  moejax.metrics  router health statistics and metric writers
"""

__version__ = "0.1.0"
