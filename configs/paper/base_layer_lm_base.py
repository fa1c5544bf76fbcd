"""StableMoE (Dai et al. 2022), Table 2 at base size: the BASE row (valid PPL 20.04).

12 blocks, D=768 (`model.size=base`), one MoE block after the middle
block (block 6, `model.moe_layers=middle`) of 32 experts, each a stack
of 3 residual FFN sublayers (`model.expert_depth=3`), routed by
BASE layers' balanced assignment.

Scanned blocks, remat `full` per block, bf16; sequences of 1,024, GPT-2-size
vocabulary (a SentencePiece of 50,304 trained on the corpus; the paper used
GPT-2's BPE). Learning rate: GPT-3's for the size (the paper gives none).

Tokens per step: 524,288 (512 x 1,024). Steps: 60,000.

Per-chip memory, measured: 15.54 GiB = 1.97 arguments + 13.57
temporaries, XLA:CPU's memory analysis of the compiled step on 8
simulated devices as mesh 1 x 8 at 8 sequences of 1,024 per device (a proxy
for an accelerator's; benchmarks/RESULTS.md, scale table):

  python benchmarks/scale.py --config configs/paper/base_layer_lm_base.py \\
      --set mesh.data=1 --set mesh.expert=8 --devices 8 --seqs-per-device 8

On a 64-chip pod slice (8 sequences per chip), the same command on
every host, on any prepared text TFDS dataset:

  moejax-train --config configs/paper/base_layer_lm_base.py --workdir gs://bucket/base_layer_lm_base \\
    --config.data.source=tfds:<name>[:split] \\
    --config.data.tfds_data_dir=gs://bucket/tfds

On N < 64 chips add --config.mesh.expert=N (N <= 32) and
--config.train.grad_accum_steps=64/N: the same 512 sequences per step.
"""

from moejax.train.presets import paper_config


def get_config():
  return paper_config("stablemoe", "base", "base")
