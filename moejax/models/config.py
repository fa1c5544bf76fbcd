"""Typed configuration of the Transformer LM and its MoE layers."""

import dataclasses
from typing import Any, NamedTuple

from moejax.errors import ConfigError
from moejax.moe.ffn_init import DEFAULT_FFN_INIT

DTYPES = ("float32", "bfloat16")
# `model.arch`: a causal decoder LM (`decoder`), a bidirectional encoder with a
# masked-LM head (`encoder`), or an encoder-decoder (`encdec`,
# `moejax.models.encdec`).
ARCHS = ("decoder", "encoder", "encdec")
# `model.remat`: what the backward pass recomputes, per block (per scanned unit
# with `model.scan_layers`): nothing (`none`); everything (`full`: only the
# block's inputs are kept); everything but matmul outputs (`dots`); everything
# but matmul outputs without batch dimensions, i.e. weights-times-activations
# (`dots_no_batch`: attention's batched score and value products recomputed).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


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
    expert_depth: n, residual FFN sublayers per routed expert (StableMoE's
      experts are stacks of 3 at base size, 6 at large); 1 is one FFN. Shared
      experts stay one FFN. See `moejax.moe.experts`.
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
  expert_depth: int = 1


class ModelStack(NamedTuple):
  """One stack of blocks of a model: its name (`encoder`, `decoder`; None for
  the decoder LM's and the encoder's blocks, kept at the top level of the
  params), its number of blocks and the indices of its MoE blocks."""

  name: str | None
  num_layers: int
  moe_layers: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """A pre-norm Transformer whose chosen FFN layers are MoE: a decoder LM, an
  encoder (masked LM) or an encoder-decoder (`arch`).

  Attributes:
    vocab_size: V.
    max_len: longest sequence (learned positions).
    num_layers: blocks of the model (`encdec`: of its decoder stack).
    d_model: D.
    num_heads: attention heads (D must divide evenly).
    d_ff: F of the dense FFNs.
    moe_layers: indices of the blocks whose FFN is MoE (`encdec`: decoder
      blocks).
    moe: the MoE FFN settings.
    dtype: compute dtype, `float32` or `bfloat16` (params stay float32; router
      logits, softmax and the output logits are always float32).
    ffn_init: initializer of every FFN, dense and expert alike
      (`moejax.moe.ffn_init.FFN_INITS`).
    scan_layers: run the blocks as `nn.scan` over repeating units
      (`moejax.layout.stacks`), params stacked with a leading `layers` axis;
      the same function as unrolled blocks (`moejax.layout.scanned` converts
      the params), compiled once per unit instead of once per block.
    remat: rematerialisation policy per block or scanned unit
      (`REMAT_POLICIES`).
    arch: `decoder`, `encoder` or `encdec` (`ARCHS`).
    num_encoder_layers: `encdec`: blocks of the encoder stack (None: as many
      as `num_layers`).
    encoder_moe_layers: `encdec`: indices of the encoder blocks whose FFN is
      MoE (StableMoE's translation model: (3,) with `moe_layers=(3,)`).
    share_embeddings: `encdec`: source and target tokens share one embedding
      (also the output projection); else the source has its own.
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
  ffn_init: str = DEFAULT_FFN_INIT
  scan_layers: bool = False
  remat: str = "none"
  arch: str = "decoder"
  num_encoder_layers: int | None = None
  encoder_moe_layers: tuple[int, ...] = ()
  share_embeddings: bool = True

  @property
  def encoder_depth(self) -> int:
    """Blocks of the `encdec` encoder stack."""
    return (self.num_layers if self.num_encoder_layers is None
            else self.num_encoder_layers)

  @property
  def block_stacks(self) -> tuple[ModelStack, ...]:
    """The model's stacks of blocks: one unnamed (`decoder`, `encoder`), or
    the encoder's then the decoder's (`encdec`)."""
    if self.arch == "encdec":
      return (ModelStack("encoder", self.encoder_depth, self.encoder_moe_layers),
              ModelStack("decoder", self.num_layers, self.moe_layers))
    return (ModelStack(None, self.num_layers, self.moe_layers),)

  @property
  def has_moe(self) -> bool:
    """Whether any block of any stack is MoE."""
    return any(st.moe_layers for st in self.block_stacks)


def resolve_moe_layers(spec: Any, num_layers: int,
                       key: str = "model.moe_layers") -> tuple[int, ...]:
  """Block indices from `every_other` (1, 3, ...), `middle`, `all`, `none`, or a
  list; `key` names the setting in errors (`model.encoder_moe_layers` for the
  encoder stack of an `encdec` model)."""
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
          f"{key}={spec!r} is not one of {', '.join(named)} or a comma "
          "list of block indices") from None
  layers = tuple(sorted(set(int(i) for i in spec)))
  bad = [i for i in layers if not 0 <= i < num_layers]
  if bad:
    raise ConfigError(
        f"{key} has indices {bad} outside 0..{num_layers - 1}; "
        "use block indices of the model")
  return layers


def transformer_config_from_json(d: dict[str, Any]) -> TransformerConfig:
  """Inverse of `dataclasses.asdict` for a TransformerConfig (config.json)."""
  moe = dict(d["moe"])
  moe["router_options"] = tuple(tuple(kv) for kv in moe["router_options"])
  return TransformerConfig(**{
      **d, "moe": MoEConfig(**moe), "moe_layers": tuple(d["moe_layers"]),
      "encoder_moe_layers": tuple(d.get("encoder_moe_layers", ()))})


def experts_per_token(top_k: int, num_shared: int = 0) -> int:
  """Experts that process each token: K routed (nominal) plus any shared ones."""
  return top_k + num_shared


def expert_width(d_ff: int, *, top_k: int, expert_d_ff: int | None,
                 equal_flops: bool, num_shared: int = 0) -> int:
  """F of each expert: `expert_d_ff` when set; else, under the equal-active-FLOPs
  rule (`equal_flops`), the dense width split over the experts each token uses,
  F / (top_k + num_shared); else F.

  A ConfigError when F does not split evenly (set `model.expert_d_ff`).
  """
  if expert_d_ff is not None:
    return expert_d_ff
  per_token = experts_per_token(top_k, num_shared)
  if not equal_flops or per_token == 1:
    return d_ff
  if d_ff % per_token:
    raise ConfigError(
        f"model.equal_flops splits model.d_ff={d_ff} over {per_token} experts per "
        f"token, which does not divide it; set model.expert_d_ff or "
        "model.equal_flops=False")
  return d_ff // per_token


def active_ffn_flops_per_token(cfg: TransformerConfig) -> int:
  """Forward FLOPs of the FFNs (dense and experts, router excluded) per token,
  summed over blocks: 2 matmuls x 2 D F per dense FFN, (top_k x expert_depth +
  shared) x 2 x 2 D F_e per MoE layer (top_k nominal: routers that use a
  varying number of experts per token, such as DSelect-k early or EvoMoE's soft
  phase, may spend more; the sublayers' norms are not counted).

  `encdec`: the encoder's FFN FLOPs of one source token plus the decoder's of
  one target token (per target token when source and target are equally
  long)."""
  expert_ff = cfg.moe.d_ff or cfg.d_ff
  per_token = (cfg.moe.top_k * cfg.moe.expert_depth
               + cfg.moe.num_shared_experts)
  return sum(
      4 * cfg.d_model * ((st.num_layers - len(st.moe_layers)) * cfg.d_ff
                         + len(st.moe_layers) * per_token * expert_ff)
      for st in cfg.block_stacks)
