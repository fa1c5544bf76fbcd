"""Typed configuration of the data pipeline (built from `config.data` by the trainer)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the text comes from and how it becomes fixed-length token sequences.

  Attributes:
    source: `embedded`, `text:<path or glob>[,<path or glob>...]`,
      `tfds:<name>[:split]` or `parallel:<source glob>,<target glob>` (with
      `task="seq2seq"`).
    seq_len: L, tokens per training sequence (the model sees L inputs and L targets).
    vocab_size: SentencePiece vocabulary size, trained on the training split.
    eval_fraction: share of the corpus carved out deterministically as the held-out
      split when the source has none.
    max_bytes: cap on the UTF-8 bytes read from the source (None: no cap).
    eval_batches: number of fixed held-out batches used by each evaluation.
    seed: seed of the per-epoch shuffle of training sequences.
    tfds_data_dir: data_dir for `tfds:` sources (None: the TFDS default).
    tokenizer_max_sentences: lines sampled from the training split to train
      SentencePiece, evenly spread over it (bounds the tokenizer's memory: the
      corpus is streamed twice, to count lines and to take the sample).
    cache_dir: where prepared datasets, tokenizers and packed windows are kept
      for every run on the same corpus (None: the user cache dir, see
      `moejax.data.cache`; "": `<workdir>/data`, a cache per workdir).
    test_fraction: share of what validation leaves carved out as a test split
      that neither training, the tokenizer nor evaluation during training sees
      (`Datasets.test_batches`; 0: none). For `tfds:` sources, the dataset's
      `test` split when validation is another split.
    bad_input: what a NUL or non-UTF-8 byte in a `text:` file does: "error" (one
      line naming the file and byte offset, nothing kept) or "skip" (its line is
      dropped and one warning per file names the first offset).
    task: what a batch holds: "lm" (next-token windows), "mlm" (masked-LM
      batches from the same windows, `moejax.data.mlm`; the tokenizer gets a
      `<mask>` symbol) or "seq2seq" (packed (source, target) pairs of a
      `parallel:` source, `moejax.data.seq2seq`; the source row is `seq_len`).
    target_len: Lt, target tokens per seq2seq row (None: `seq_len`).
    overlong: a seq2seq pair longer than its row: "error" (one line naming the
      file, line and lengths) or "truncate" (cut to fit, EOS kept).
    languages: "<source>,<target>": the two text features (language keys) of a
      `tfds:` translation dataset read with `task="seq2seq"` (e.g. "de,en";
      None: its first two).
    mlm_probability: share of the real tokens chosen for prediction per step
      (each split 80/10/10 into mask / random token / unchanged).
  """

  source: str = "embedded"
  seq_len: int = 128
  vocab_size: int = 1024
  eval_fraction: float = 0.05
  max_bytes: int | None = 4_000_000
  eval_batches: int = 8
  seed: int = 0
  tfds_data_dir: str | None = None
  tokenizer_max_sentences: int = 200_000
  cache_dir: str | None = None
  test_fraction: float = 0.0
  bad_input: str = "error"
  task: str = "lm"
  target_len: int | None = None
  overlong: str = "error"
  mlm_probability: float = 0.15
  languages: str | None = None

  @property
  def row_tokens(self) -> int:
    """Tokens of one training row: a window's `seq_len`, a seq2seq row's
    source and target sides together."""
    if self.task == "seq2seq":
      return self.seq_len + (self.target_len or self.seq_len)
    return self.seq_len
