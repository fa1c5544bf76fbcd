"""The Transformer models (decoder LM, encoder masked LM, encoder-decoder)
and their typed configuration."""

from moejax.models.config import MoEConfig, TransformerConfig, resolve_moe_layers
from moejax.models.encdec import EncoderDecoder, make_model
from moejax.models.losses import mlm_loss, seq2seq_loss
from moejax.models.transformer import TransformerLM

__all__ = ["EncoderDecoder", "MoEConfig", "TransformerConfig", "TransformerLM",
           "make_model", "mlm_loss", "resolve_moe_layers", "seq2seq_loss"]
