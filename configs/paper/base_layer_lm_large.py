"""StableMoE (Dai et al. 2022), Table 2 at large size: the BASE row (valid PPL 16.36).

24 blocks, D=1024 (`model.size=large`), one MoE block after the middle
block (block 12, `model.moe_layers=middle`) of 64 experts, each a stack
of 6 residual FFN sublayers (`model.expert_depth=6`), routed by
BASE layers' balanced assignment.

Params and Adam moments sharded (`mesh.shard_params`), each step in 4
micro-batches (`train.grad_accum_steps=4`), to fit 16 GiB per chip.
Scanned blocks, remat `full` per block, bf16; sequences of 1,024, GPT-2-size
vocabulary (a SentencePiece of 50,304 trained on the corpus; the paper used
GPT-2's BPE). Learning rate: GPT-3's for the size (the paper gives none).

Tokens per step: 524,288 (512 x 1,024). Steps: 60,000.

Per-chip memory, measured: 13.39 GiB = 4.98 arguments + 8.41
temporaries, XLA:CPU's memory analysis of the compiled step on 8
simulated devices as mesh 1 x 8 at 8 sequences of 1,024 per device (a proxy
for an accelerator's; benchmarks/RESULTS.md, scale table):

  python benchmarks/scale.py --config configs/paper/base_layer_lm_large.py \\
      --set mesh.data=1 --set mesh.expert=8 --devices 8 --seqs-per-device 8

On a 64-chip pod slice (8 sequences per chip), the same command on
every host, on any prepared text TFDS dataset:

  moejax-train --config configs/paper/base_layer_lm_large.py --workdir gs://bucket/base_layer_lm_large \\
    --config.data.source=tfds:<name>[:split] \\
    --config.data.tfds_data_dir=gs://bucket/tfds

On N < 64 chips add --config.mesh.expert=N (N <= 64) and
--config.train.grad_accum_steps=64/N: the same 512 sequences per step.
"""

from moejax.train.presets import paper_config


def get_config():
  return paper_config("stablemoe", "base", "large")
