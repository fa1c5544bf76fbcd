"""EvoMoE (Nie et al.): one dense expert first, then diversify and sparsify.

  moejax-train --config configs/evomoe.py --workdir /tmp/moejax-evomoe

Stage 0 `dense` (25% of the steps): every FFN is dense. Stage 1 `dts`: transform
`diversify` replicates each FFN of blocks 1 and 3 into 8 experts, each with an
independent Bernoulli mask zeroing 20% of its weights (Adam moments replicated
unmasked), then the Dense-to-Sparse gate routes: Gumbel-softmax with temperature
annealed exponentially from 1.0 to 0.5 over 300 steps, every expert above 0.001
used, hard sampled top-1 from stage step 360; evaluation is deterministic top-1.

Measured on a 2-core CPU: see the README section "Stages".
"""

from moejax.train.config import default_config, stage_config


def get_config():
  c = default_config()
  c.train.steps = 600
  c.train.batch_size = 16
  c.train.log_every = 20
  c.train.eval_every = 100
  c.train.checkpoint_every = 200
  c.train.probe_every = 20
  c.model.moe_layers = "every_other"
  c.model.num_experts = 8
  c.model.top_k = 1
  c.model.router = "dts"
  c.model.dispatch = "dropless"
  c.model.router_options = {"tau_max": 1.0, "tau_min": 0.5, "anneal_steps": 300,
                            "schedule": "exponential", "threshold": 1e-3,
                            "hard_step": 360}
  c.stages = [
      stage_config("dense", fraction=0.25, model={"moe_layers": "none"}),
      stage_config("dts", transform="diversify",
                   transform_options={"mask_ratio": 0.2, "moments": "replicate"}),
  ]
  return c
