"""EvoMoE (Nie et al.): one dense expert first, then diversify and sparsify.

  moejax-train --config configs/evomoe.py --workdir /tmp/moejax-evomoe

Stage 0 `dense` (25% of the steps): every FFN is dense. Stage 1 `dts`: transform
`diversify` replicates each FFN of blocks 1 and 3 into 8 experts, each with an
independent Bernoulli mask zeroing 20% of its weights (Adam moments replicated
unmasked), then the Dense-to-Sparse gate routes: Gumbel-softmax with temperature
annealed linearly from 1.0 to 0.1 over 300 steps, every expert above 0.001
used, hard sampled top-1 from stage step 360; evaluation is deterministic top-1.
The authors' published commands, not fairseq's class defaults: no gate balance
loss, as their DTS scripts (`--criterion cross_entropy`; set
`model.router_options.aux_loss_coef=0.01` for their balanced script's
`--moe-gate-loss-wt 0.01 --moe-gate-loss-combine-method sum`, which held the
gate near uniform in the 1000-step comparison), and, from the balanced script, the
temperature decays linearly (`--gumbel-decay-scheduler Linear`). tau_min 0.1
instead of the code's default 0.5, which leaves 6.4 of 8 experts per token
above the threshold: with 0.1 the soft phase goes from dense to about one
expert (docs/fidelity.md). Softmax combine weights in training and evaluation,
as the reference's default. Dropless dispatch, at the cost of the experts each
token uses.

Measured in the router comparison (docs/fidelity.md, experiments/README.md);
see docs/stages.md.
"""

from moejax.train.presets import method_config


def get_config():
  return method_config("evomoe", steps=600)
