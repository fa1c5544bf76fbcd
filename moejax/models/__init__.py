"""The decoder-only Transformer LM and its typed configuration."""

from moejax.models.config import MoEConfig, TransformerConfig, resolve_moe_layers
from moejax.models.transformer import TransformerLM

__all__ = ["MoEConfig", "TransformerConfig", "TransformerLM", "resolve_moe_layers"]
