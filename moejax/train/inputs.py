"""What the train, eval and probe steps read from a data batch, and how they
call the model with it, for every task (`data.task`).

Shapes: B batch, L length (a seq2seq batch's encoder arrays have the source
length `data.seq_len`, its decoder arrays and labels the target length
`data.target_len`).

A model batch (`model_inputs`), the arrays a step reads:
- lm: `inputs` [B, L] and `targets` [B, L] (the next tokens);
- mlm: the same plus `weights` [B, L] (1 at the masked positions scored);
- seq2seq: `encoder_input_tokens`, `encoder_segment_ids`, `encoder_positions`,
  `decoder_input_tokens`, `decoder_segment_ids`, `decoder_positions`, and as
  `targets` and `weights` the data's `decoder_target_tokens` and
  `decoder_loss_weights` (`moejax.data.seq2seq`).
Every task scores `targets` under `weights` (all ones when absent) with the
one loss of `moejax.models.losses`; `apply_model` is the only place that
knows which model takes which arrays.
"""

import jax
import jax.numpy as jnp

from moejax.models.config import TransformerConfig

SEQ2SEQ_INPUTS = ("encoder_input_tokens", "encoder_segment_ids",
                  "encoder_positions", "decoder_input_tokens",
                  "decoder_segment_ids", "decoder_positions")


def is_seq2seq(batch) -> bool:
  return "encoder_input_tokens" in batch


def model_inputs(batch):
  """The model batch (module docstring) of a data batch: the arrays the step
  reads, without the domains."""
  if is_seq2seq(batch):
    return {**{key: batch[key] for key in SEQ2SEQ_INPUTS},
            "targets": batch["decoder_target_tokens"],
            "weights": batch["decoder_loss_weights"]}
  keys = ("inputs", "targets", "weights") if "weights" in batch else (
      "inputs", "targets")
  return {key: batch[key] for key in keys}


def apply_model(model, variables, batch, **kwargs):
  """`model.apply(variables, <the batch's model arguments>, **kwargs)`: the
  decoder LM or encoder on `inputs`, the encoder-decoder on the source and
  target ids with their segments and positions (packed rows)."""
  if not is_seq2seq(batch):
    return model.apply(variables, batch["inputs"], **kwargs)
  return model.apply(
      variables, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
      source_segments_BL=batch["encoder_segment_ids"],
      target_segments_BL=batch["decoder_segment_ids"],
      source_positions_BL=batch["encoder_positions"],
      target_positions_BL=batch["decoder_positions"], **kwargs)


def example_inputs(config: TransformerConfig, seq_len: int,
                   target_len: int | None = None) -> tuple[jax.Array, ...]:
  """Zero ids to initialise the model of `config` with: (tokens [1, L]), or an
  encoder-decoder's (source [1, L], target [1, L])."""
  tokens_BL = jnp.zeros((1, seq_len), jnp.int32)
  if config.arch != "encdec":
    return (tokens_BL,)
  return tokens_BL, jnp.zeros((1, target_len or seq_len), jnp.int32)
