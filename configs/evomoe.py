"""EvoMoE (Nie et al.): one dense expert first, then diversify and sparsify.

  moejax-train --config configs/evomoe.py --workdir /tmp/moejax-evomoe

Stage 0 `dense` (25% of the steps): every FFN is dense. Stage 1 `dts`: transform
`diversify` replicates each FFN of blocks 1 and 3 into 8 experts, each with an
independent Bernoulli mask zeroing 20% of its weights (Adam moments replicated
unmasked), then the Dense-to-Sparse gate routes: Gumbel-softmax with temperature
annealed exponentially from 1.0 to 0.5 over 300 steps, every expert above 0.001
used, hard sampled top-1 from stage step 360; evaluation is deterministic top-1.
As the reference code: softmax combine weights in training and evaluation, its
balance loss E^2 mean_i(me_i ce_i) with weight 1.0 averaged over the MoE
layers. Dropless dispatch, at the cost of the experts each token uses.

Measured in the router comparison (experiments/README.md); see docs/stages.md.
"""

from moejax.train.presets import method_config


def get_config():
  return method_config("evomoe", steps=600)
