"""moejax: Mixture-of-Experts Transformers with stable routing, in JAX/Flax.

Import what you need from the subpackages (importing `moejax` alone is light):
  moejax.routing   routers behind one contract, their registry and losses
  moejax.moe       dispatch (capacity, dropless), stacked experts, the MoE layer
  moejax.kernels   grouped matmul (Pallas, megablox, ragged_dot) with a custom VJP
  moejax.parallel  device mesh, sharding rules, the expert-parallel shard_map layer
  moejax.models    the decoder-only Transformer LM
  moejax.stages    params -> params stage transforms (diversify, upcycle, freeze)
  moejax.pytree    path rules over param trees; moejax.layout the model's paths
  moejax.train     config, presets, the pure step, the stage loop, checkpoints
  moejax.data      corpora, the TFDS text builder, tokenizer, packing
  moejax.metrics   router health, routing fluctuation, metric writers
  moejax.shapes    the glossary of shape letters in names, one meaning each
"""

__version__ = "0.1.0"
