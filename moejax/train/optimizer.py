"""AdamW with warmup and decay, gradient clipping, and decay only on matrices.

Weight decay reaches matrices and stacked expert weights, never norms, vectors
or (unless `decay_router`) routing params: router gates and centroids, BASE's
expert embeddings, StableMoE's distilled embedding and centroids, the DTS and
DSelect-k gates. Decay would pull those toward zero, which changes routing by
itself (a smaller gate is a flatter softmax; StableMoE's and BASE's sigmoid
gates shrink); the reference code of StableMoE and BASE trains them with Adam
and no decay. Every router's params live under `<moe layer>/router/`
(`ROUTER_PARAMS`).
"""

import dataclasses
import functools
from typing import Sequence

import jax
import optax

from moejax import layout
from moejax.pytree import match_rules, path_str

SCHEDULES = ("cosine", "linear", "constant")
# Path rules of routing params (every router's params are under `router/`).
ROUTER_PARAMS = (r"(.*/)?router/.*",)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW settings.

  Attributes:
    learning_rate: peak learning rate after warmup.
    warmup_steps: linear warmup from 0.
    schedule: decay after warmup: `cosine`, `linear` or `constant`.
    end_lr_ratio: final learning rate as a share of the peak.
    weight_decay: decoupled weight decay, applied to params with ndim >= 2
      (a scanned leaf's `layers` axis not counted) except routing params.
    decay_router: also decay routing params (`ROUTER_PARAMS`).
    b1: Adam beta1.
    b2: Adam beta2.
    grad_clip: global-norm clipping threshold (0: off).
  """

  learning_rate: float = 3e-3
  warmup_steps: int = 50
  schedule: str = "cosine"
  end_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0
  decay_router: bool = False


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then the configured decay until total_steps."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  end = cfg.learning_rate * cfg.end_lr_ratio
  decay_steps = max(total_steps - warmup, 1)
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps,
                                        alpha=cfg.end_lr_ratio)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(cfg.learning_rate, end, decay_steps)
  else:
    decay = optax.constant_schedule(cfg.learning_rate)
  warm = optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1))
  return optax.join_schedules([warm, decay], [warmup])


def decay_mask(params, *, decay_router: bool = False):
  """True for matrices and stacked expert weights; False for norms, vectors and
  (unless `decay_router`) routing params."""
  router = (jax.tree.map(lambda _: False, params) if decay_router
            else match_rules(params, ROUTER_PARAMS))

  def decays(path, p, r):
    # A scanned leaf's leading `layers` axis stacks blocks; it is no matrix
    # dim, so a scanned norm scale (one vector per block) stays a vector.
    return p.ndim - layout.in_stack(path_str(path)) >= 2 and not r
  return jax.tree_util.tree_map_with_path(decays, params, router)


def make_optimizer(cfg: OptimizerConfig, total_steps: int,
                   frozen: Sequence[str] = ()) -> optax.GradientTransformation:
  """freeze -> clip_by_global_norm -> AdamW(schedule, decay on matrices) -> freeze.

  Decay skips routing params unless `cfg.decay_router` (module docstring).

  Params whose path matches a `frozen` rule get a zero gradient (so clipping and
  moments ignore them) and a zero update (so weight decay cannot move them): they
  stay bit-identical. The state has the same structure whatever is frozen and
  with clipping on or off, so stages and resumed runs can change both.
  """
  frozen = tuple(frozen)
  freeze = optax.masked(optax.set_to_zero(),
                        lambda params: match_rules(params, frozen))
  adamw = optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1,
                      b2=cfg.b2, weight_decay=cfg.weight_decay,
                      mask=functools.partial(decay_mask,
                                             decay_router=cfg.decay_router))
  clip = (optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0
          else optax.identity())
  return optax.chain(freeze, clip, adamw, freeze)
