"""Corpora, the TFDS text builder, tokenizer and packing: text in, int32 batches out.

Public API:
  DataConfig                        the frozen config of the pipeline (`config.data`)
  load_datasets(cfg, *, workdir, batch_size) -> Datasets
                                    builds or reuses everything under `workdir`
  Datasets                          `.train[i]` (batch i), `.train_rows(i, rows)`
                                    (only those rows of it), `.eval_batches`,
                                    `.tokenizer`, `.vocab_size`, `.domain_names`,
                                    `.train_sequences`, `.eval_sequences`,
                                    `.train_tokens`, `.steps_per_epoch`, `.describe()`
  validate(cfg)                     DataError for a bad config, without reading data
  PAD_ID, UNK_ID, BOS_ID, EOS_ID    fixed special token ids (0, 1, 2, 3)

A batch is `{"inputs", "targets", "domains"}`, each int32[B, L] (`data.task=lm`);
with `data.task=mlm` also `weights` float32[B, L] (`mlm`); with `data.task=seq2seq`
and a `parallel:` source, the `encoder_*` and `decoder_*` keys of `seq2seq`
([B, L], L `data.seq_len` and `data.target_len`).

Shapes: B batch, L length (`data.seq_len`; a seq2seq target's `data.target_len`).

Modules: `sources` (parse and open `data.source`), `embedded` (the offline stdlib
corpus), `tfds_source` (`tfds:` datasets), `documents` (byte caps and the held-out
carve), `text_builder` (the `moejax_text` TFDS builder), `tokenizer` (SentencePiece),
`stream` (corpora read, chunked and carved in bounded memory), `packing` (token
windows and their sharded cache), `pipeline` (`load_datasets`), `rows` (each
process reading only the rows of a batch its devices hold), `parallel`
(line-aligned translation pairs), `seq2seq` (pairs packed into rows with segment
ids), `mlm` (dynamic 80/10/10 masking).
Importing this package is light: TFDS, grain and SentencePiece load on first use.
"""

from moejax.data.config import DataConfig
from moejax.data.pipeline import Datasets, load_datasets, validate
from moejax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

__all__ = ["DataConfig", "Datasets", "load_datasets", "validate",
           "PAD_ID", "UNK_ID", "BOS_ID", "EOS_ID"]
