"""StableMoE (Dai et al. 2022): learn a balanced routing and distill it, then freeze.

  moejax-train --config configs/stablemoe.py --workdir /tmp/moejax-stablemoe

Stage 0 `distill` (20% of the steps; the paper used 10% of a much longer run):
greedy centroid routing with the balance loss (alpha 0.3) while a token-id router
(width 50) learns the assignment by cross-entropy (weight 0.3). Stage 1 `frozen`:
transform `freeze_distilled_router`, then routing by the frozen distilled router;
the gate sigma(e_a . h) keeps training. One MoE block (8 experts) in the middle of
the 4-block decoder, as the paper places it, at the reference code's capacity
factor 2 (the frozen router cannot rebalance in stage 1). Probes every 20 steps record each
held-out probe token's expert; `fluctuation.json`/`.png` show when tokens settle.

Measured on a 2-core CPU: routing fluctuation exactly 0 in
stage 1; eval perplexity 122.7 at the stage boundary (step 120), 37.0 at step 600.
"""

from moejax.train.presets import method_config


def get_config():
  c = method_config("stablemoe", steps=600)
  c.model.moe_layers = "middle"
  return c
