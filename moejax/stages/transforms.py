"""Stage transforms: pure `params -> params` changes applied between training loops.

Shapes: D model width, F hidden width, E experts.

- `diversify(params, num_experts, mask_ratio, key, where=rule)`: EvoMoE's
  expert-diversify; each dense FFN the path rule selects (in any stack of
  blocks: top-level `block_<i>`, or an encoder-decoder's `encoder/block_<i>`
  and `decoder/block_<i>`) becomes E experts,
  expert e = the FFN's weights times an independent per-element Bernoulli mask
  that zeroes a share `mask_ratio` of them (no rescale).
- `upcycle(dense_params, num_experts, ...)`: sparse upcycling of a dense checkpoint,
  the same code path (mask_ratio 0 by default: every expert a copy).
- `freeze_distilled_router`: params unchanged; StableMoE's distilled router is
  excluded from optimizer updates from this stage on.

A registered `Transition` bundles what the stage machine needs: the params
function, how optimizer moments are carried, and the params it freezes.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax.models.config import TransformerConfig
from moejax.layout import DENSE_FFN, block_position, moe_ffn_rule
from moejax.pytree import Rule, select, update
from moejax.routing.stablemoe import FREEZE_DISTILLED


@dataclasses.dataclass(frozen=True)
class TransitionContext:
  """What a transform sees: the model before and after, a key, its options."""

  old: TransformerConfig
  new: TransformerConfig
  key: jax.Array
  options: dict[str, Any]


_STACK_SALTS = {"encoder": 1, "decoder": 2}


def _block_key(key: jax.Array, path: str) -> jax.Array:
  """The key of the block at `path`: fold_in(key, i) for top-level block i,
  folded again with its stack's salt in an encoder-decoder, so the two stacks'
  block i draw different masks."""
  stack, i = block_position(path)
  block_key = jax.random.fold_in(key, i)
  return block_key if stack is None else jax.random.fold_in(
      block_key, _STACK_SALTS[stack])


def diversify(params: dict, num_experts: int, mask_ratio: float, key: jax.Array,
              *, where: Rule = DENSE_FFN) -> dict:
  """Replaces each dense FFN subtree whose path matches `where` (a path rule,
  `moejax.pytree`; default every block's, `moejax.layout.ffn_rule` picks
  blocks, `moejax.layout.moe_ffn_rule` a model's MoE blocks) by E masked
  copies, the MoE layer's experts beside it:
  `<block>/ffn` -> `<block>/moe/experts`, w_in [E, D, F], w_out [E, F, D].

  Each expert's mask is drawn independently, per element, keep probability
  1 - mask_ratio (key `fold_in(key, i)` in top-level block i; a stack's block
  i folds in its stack too); masked weights are zero (kept ones are not
  rescaled). Router params are not created here: the stage machine takes them
  from a fresh init.
  """
  if not 0.0 <= mask_ratio < 1.0:
    raise ConfigError(f"diversify mask_ratio={mask_ratio} must be in [0, 1)")
  ffns = select(params, where)
  if not all(path.endswith("/ffn") for path in ffns):
    raise ConfigError(f"diversify: the rule {where!r} selects {', '.join(ffns)};"
                      " it must select dense FFNs (<block>/ffn)")

  def masked_copies(w, k):
    stacked = jnp.broadcast_to(w, (num_experts, *w.shape))
    if mask_ratio == 0.0:
      return stacked
    keep = jax.random.bernoulli(k, 1.0 - mask_ratio, stacked.shape)
    return jnp.where(keep, stacked, 0).astype(w.dtype)

  def to_experts(path, parent):
    ffn = parent["ffn"]
    k_in, k_out = jax.random.split(_block_key(key, path))
    out = {k: v for k, v in parent.items() if k != "ffn"}
    out["moe"] = {"experts": {
        "w_in": masked_copies(ffn["w_in"]["kernel"], k_in),
        "w_out": masked_copies(ffn["w_out"]["kernel"], k_out)}}
    return out

  return update(params, lambda path: f"{path}/ffn" in ffns, to_experts)


def upcycle(dense_params: dict, num_experts: int, *, key: jax.Array,
            where: Rule = DENSE_FFN, mask_ratio: float = 0.0) -> dict:
  """Sparse upcycling: the dense FFNs `where` selects become E experts (see
  `diversify`)."""
  return diversify(dense_params, num_experts, mask_ratio, key, where=where)


@dataclasses.dataclass(frozen=True)
class Transition:
  """A stage-entry transform.

  Attributes:
    params: (old params, context) -> params of the new model (partial trees are
      completed from a fresh init of the new model).
    moments: (an optimizer tree shaped like the old params, context) -> the same
      for the new params, or None to carry leaves whose path and shape match and
      zero the rest.
    frozen: path rules of params excluded from updates from this stage on.
    options: the transform's options and their defaults.
    check: the new model -> None, or a ConfigError when the transform cannot
      produce it (run when the config is parsed).
  """

  params: Callable[[dict, TransitionContext], dict]
  moments: Callable[[dict, TransitionContext], dict] | None = None
  frozen: tuple[str, ...] = ()
  options: dict[str, Any] = dataclasses.field(default_factory=dict)
  check: Callable[[TransformerConfig], None] = lambda new: None


def _check_depth_one(new: TransformerConfig) -> None:
  """Experts copied from a dense FFN are one FFN each (no justified mapping of
  one FFN onto a stack of residual sublayers)."""
  if new.moe.expert_depth != 1:
    raise ConfigError(
        f"diversify/upcycle build experts from a dense FFN of depth 1, but "
        f"model.expert_depth={new.moe.expert_depth}; use expert_depth=1")


def _diversify_params(params, ctx: TransitionContext):
  _check_depth_one(ctx.new)
  return diversify(params, ctx.new.moe.num_experts, ctx.options["mask_ratio"],
                   ctx.key, where=moe_ffn_rule(ctx.new))


def _replicate_moments(tree, ctx: TransitionContext):
  """replicate: each expert starts with the dense FFN's moments (no mask);
  reset: the experts' moments start at zero (the dense ones are dropped)."""
  _check_depth_one(ctx.new)
  if ctx.options["moments"] == "reset":
    return tree
  return diversify(tree, ctx.new.moe.num_experts, 0.0, ctx.key,
                   where=moe_ffn_rule(ctx.new))


TRANSFORMS: dict[str, Transition] = {
    "freeze_distilled_router": Transition(
        params=lambda params, ctx: params, frozen=(FREEZE_DISTILLED,)),
    "diversify": Transition(
        params=_diversify_params, moments=_replicate_moments,
        options={"mask_ratio": 0.2, "moments": "replicate"},
        check=_check_depth_one),
    "upcycle": Transition(
        params=_diversify_params, moments=_replicate_moments,
        options={"mask_ratio": 0.0, "moments": "replicate"},
        check=_check_depth_one),
}


def get_transition(name: str, options: dict[str, Any] | None = None
                   ) -> tuple[Transition, dict[str, Any]]:
  """The transform `name` and its options with defaults filled in."""
  if name not in TRANSFORMS:
    raise ConfigError(f"unknown stage transform {name!r}; valid: "
                      f"{', '.join(sorted(TRANSFORMS))}")
  transition = TRANSFORMS[name]
  merged = dict(transition.options)
  for key, value in (options or {}).items():
    if key not in merged:
      raise ConfigError(f"stage transform {name!r} has no option {key!r}; valid: "
                        f"{', '.join(sorted(merged)) or '(none)'}")
    merged[key] = value
  if "moments" in merged and merged["moments"] not in ("replicate", "reset"):
    raise ConfigError(f"stage transform {name!r} moments={merged['moments']!r}; "
                      "use replicate or reset")
  return transition, merged
