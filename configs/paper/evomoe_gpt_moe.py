"""EvoMoE (Nie et al.): its GPT-MoE language model, trained by EvoMoE.

Stage `dense` (the first 15K steps, 25%): every FFN dense; stage `dts`:
`diversify` replicates each FFN of the MoE blocks into 32 masked experts and
the Dense-to-Sparse gate anneals from dense to top-1 (configs/evomoe.py).

GPT small: 12 blocks, D=768 (`model.size=base`, the scripts'
`transformer_lm_gptsmall_moe`), every other FFN an MoE (`--moe-freq 2`:
blocks 1, 3, ..., 11) of 32 experts (the scripts leave the count to the
caller). Batch and steps are left to the caller too: StableMoE's budget
here, so the two papers' configs compare.

The authors train with FSDP and activation checkpointing: scanned blocks,
remat `full` per block and bf16 here; sharded params and optimizer state are
`--config.mesh.shard_params=True` where that option exists.

Tokens per step: 524,288 (512 x 1,024). Steps: 60,000.

Per-chip memory, measured: 13.82 GiB = 2.34 arguments + 11.47
temporaries (the `dts` stage; `dense` 2.89), XLA:CPU's memory analysis of the compiled step on 8
simulated devices as mesh 1 x 8 at 8 sequences of 1,024 per device (a proxy
for an accelerator's; benchmarks/RESULTS.md, scale table):

  python benchmarks/scale.py --config configs/paper/evomoe_gpt_moe.py \\
      --set mesh.data=1 --set mesh.expert=8 --devices 8 --seqs-per-device 8

On a 64-chip pod slice (8 sequences per chip), the same command on
every host, on any prepared text TFDS dataset:

  moejax-train --config configs/paper/evomoe_gpt_moe.py --workdir gs://bucket/evomoe_gpt_moe \\
    --config.data.source=tfds:<name>[:split] \\
    --config.data.tfds_data_dir=gs://bucket/tfds

On N < 64 chips add --config.mesh.expert=N (N <= 32) and
--config.train.grad_accum_steps=512/N (default 8: one sequence per chip per
micro-step, since the soft DTS phase sends tokens to many experts).
"""

from moejax.train.presets import paper_config


def get_config():
  return paper_config("gpt_moe", "evomoe")
