"""StableMoE (Dai et al. 2022), Table 3 (translation, average BLEU over WMT
X -> En): the dense (BLEU 28.31) row.

An encoder-decoder of 6 + 6 blocks, D=512 (`model.size=transformer_base`),
every FFN dense,
32 experts in the MoE blocks after encoder block 3 and decoder block 3
(`model.encoder_moe_layers=middle`, `model.moe_layers=middle`; dense: none), a joint
SentencePiece of 64,000 (the paper's 64K), rows of 128 source + 128 target
tokens (`data.overlong=truncate`), label smoothing 0.1, fairseq's
Transformer schedule (peak 7e-4 after 4K warm-up steps, Adam b2 0.98). The
paper trains on WMT X -> En over 9 languages; any TFDS translate dataset
stands in: wmt14_translate/de-en (De -> En) by default.

Tokens per step: 131,072 (512 rows x 256).
Steps: 352,000.

On a pod slice of 32 chips or more (one expert per chip), on every host:

  moejax-train --config configs/paper/dense_mt.py --workdir gs://bucket/dense_mt \\
    --config.data.tfds_data_dir=gs://bucket/tfds

(`tfds build wmt14_translate/de-en --data_dir gs://bucket/tfds` prepares the
data; another pair: --config.data.source=tfds:<name>/<config>
--config.data.languages=<source>,<target>.) On N < 32 chips add
--config.mesh.expert=N.
"""

from moejax.train.presets import mt_paper_config


def get_config():
  return mt_paper_config("dense")
