"""Typed configuration of the Transformer LM and its MoE layers."""

import dataclasses
from typing import Any

from moejax.errors import ConfigError

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """The MoE FFN used at the positions listed in `TransformerConfig.moe_layers`.

  Attributes:
    num_experts: E.
    top_k: K, routing slots per token.
    router: a name registered in `moejax.routing.ROUTERS`.
    router_options: extra router fields as sorted (name, value) pairs.
    dispatch: `capacity` or `dropless`.
    capacity_factor: C = ceil(capacity_factor * T * K / E) per MoE layer.
    d_ff: F of each expert, routed and shared (None: the dense FFN width;
      configs built by `moejax.train.parse` set it, see `expert_width`).
    matmul: grouped matmul of the dropless path (`moejax.kernels.MATMUL_IMPLS`:
      xla, pallas, megablox, auto).
    num_shared_experts: K_s FFNs every token uses besides its routed experts
      (DeepSeekMoE's shared experts).
  """

  num_experts: int = 8
  top_k: int = 1
  router: str = "switch"
  router_options: tuple[tuple[str, Any], ...] = ()
  dispatch: str = "capacity"
  capacity_factor: float = 1.25
  d_ff: int | None = None
  matmul: str = "xla"
  num_shared_experts: int = 0


def expert_width(d_ff: int, top_k: int, num_shared_experts: int = 0) -> int:
  """F_e = F // (K + K_s): the expert width at which a token's K routed and K_s
  shared experts do the dense FFN's active FLOPs (fine-grained experts: m times
  the experts and m times K give width F / m). At least 1."""
  return max(1, d_ff // (top_k + num_shared_experts))


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """A pre-norm decoder-only Transformer whose chosen FFN layers are MoE.

  Attributes:
    vocab_size: V.
    max_len: longest sequence (learned positions).
    num_layers: decoder blocks.
    d_model: D.
    num_heads: attention heads (D must divide evenly).
    d_ff: F of the dense FFNs.
    moe_layers: indices of the blocks whose FFN is MoE.
    moe: the MoE FFN settings.
    dtype: compute dtype, `float32` or `bfloat16` (params stay float32; router
      logits, softmax and the output logits are always float32).
  """

  vocab_size: int
  max_len: int
  num_layers: int = 4
  d_model: int = 128
  num_heads: int = 4
  d_ff: int = 512
  moe_layers: tuple[int, ...] = ()
  moe: MoEConfig = MoEConfig()
  dtype: str = "float32"


def resolve_moe_layers(spec: Any, num_layers: int) -> tuple[int, ...]:
  """Block indices from `every_other` (1, 3, ...), `middle`, `all`, `none`, or a list."""
  if isinstance(spec, str):
    named = {
        "every_other": tuple(range(1, num_layers, 2)),
        "middle": (num_layers // 2,),
        "all": tuple(range(num_layers)),
        "none": (),
    }
    if spec in named:
      return named[spec]
    try:
      spec = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
      raise ConfigError(
          f"model.moe_layers={spec!r} is not one of {', '.join(named)} or a comma "
          "list of block indices") from None
  layers = tuple(sorted(set(int(i) for i in spec)))
  bad = [i for i in layers if not 0 <= i < num_layers]
  if bad:
    raise ConfigError(
        f"model.moe_layers has indices {bad} outside 0..{num_layers - 1}; "
        "use block indices of the model")
  return layers


def transformer_config_from_json(d: dict[str, Any]) -> TransformerConfig:
  """Inverse of `dataclasses.asdict` for a TransformerConfig (config.json)."""
  moe = dict(d["moe"])
  moe["router_options"] = tuple(tuple(kv) for kv in moe["router_options"])
  return TransformerConfig(**{**d, "moe": MoEConfig(**moe),
                              "moe_layers": tuple(d["moe_layers"])})
