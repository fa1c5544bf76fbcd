"""StableMoE (Dai et al. 2022), Table 3 (WMT X -> En): the dense (BLEU 28.31): every FFN dense.

The shape every row shares (docs/configs.md, `mt_paper_config`): 6 + 6
blocks at D=512, 32 experts after encoder and decoder block 3, SentencePiece
64K, on a TFDS translate dataset (wmt14_translate/de-en by default).

Tokens per step: 131,072 (512 rows x 128 + 128).
Steps: 352,000.

  moejax-train --config configs/paper/dense_mt.py --workdir gs://bucket/dense_mt \\
    --config.data.tfds_data_dir=gs://bucket/tfds

On N < 32 chips add --config.mesh.expert=N.
"""

from moejax.train.presets import mt_paper_config


def get_config():
  return mt_paper_config("dense")
