"""StableMoE (Dai et al. 2022): learn a balanced routing and distill it, then freeze.

  moejax-train --config configs/stablemoe.py --workdir /tmp/moejax-stablemoe

Stage 0 `distill` (20% of the steps; the paper used 10% of a much longer run):
greedy centroid routing with the balance loss (alpha 0.3) while a token-id router
(width 50) learns the assignment by cross-entropy (weight 0.3). Stage 1 `frozen`:
transform `freeze_distilled_router`, then routing by the frozen distilled router;
the gate sigma(e_a . h) keeps training. One MoE block (8 experts) in the middle of
a 4-block decoder, as the paper places it. Probes every 20 steps record each held-
out probe token's expert; `fluctuation.json`/`.png` show when tokens settle.

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
  c.model.moe_layers = "middle"
  c.model.num_experts = 8
  c.model.top_k = 1
  c.model.router = "stablemoe"
  c.model.router_options = {"stage": 1, "balance_alpha": 0.3,
                            "distill_weight": 0.3, "distill_dim": 50}
  c.stages = [
      stage_config("distill", fraction=0.2),
      stage_config("frozen", transform="freeze_distilled_router",
                   model={"router_options": {"stage": 2}}),
  ]
  return c
