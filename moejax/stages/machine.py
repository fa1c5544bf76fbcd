"""Entering a stage: transform the previous stage's state into the next one's.

The new model's state is built fresh (init), then overlaid with what the
transform makes of the old params; optimizer moments are carried the same way
(path by path), and step counts continue.

The train state is typed but not imported at run time: `moejax.train` imports
this module (the loop enters stages), so importing `moejax.train` here would be
a cycle whenever `moejax.stages` is imported first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from moejax import layout
from moejax.errors import ConfigError
from moejax.models.config import TransformerConfig
from moejax.pytree import count_matches, overlay
from moejax.stages.stage import Stage
from moejax.stages.transforms import TransitionContext, get_transition

if TYPE_CHECKING:
  from moejax.train.state import TrainState


def carry_opt_state(old_opt, old_params, fresh_opt, new_params, moments_fn):
  """The fresh optimizer state of the new params, with every leaf the old state
  can supply: moment trees (shaped like the params) via `moments_fn` and a
  path-wise overlay, scalar leaves (step counts) copied."""
  new_def = jax.tree.structure(new_params)
  old_def = jax.tree.structure(old_params)
  is_new = lambda x: jax.tree.structure(x) == new_def  # noqa: E731
  is_old = lambda x: jax.tree.structure(x) == old_def  # noqa: E731
  old_items = jax.tree.leaves(old_opt, is_leaf=is_old)
  fresh_items, treedef = jax.tree.flatten(fresh_opt, is_leaf=is_new)
  if len(old_items) != len(fresh_items):
    raise ConfigError("the optimizer changed shape between stages; stages must "
                      "share the optimizer (optim.*)")
  out = []
  for old, fresh in zip(old_items, fresh_items):
    if is_new(fresh):
      out.append(overlay(fresh, moments_fn(old)))
    elif jnp.shape(old) == jnp.shape(fresh):
      out.append(jnp.asarray(old, dtype=jnp.asarray(fresh).dtype))
    else:
      out.append(fresh)
  return jax.tree.unflatten(treedef, out)


def transition_key(seed: int, stage_index: int) -> jax.Array:
  """The key of the transform entering `stage_index` (same on every resume)."""
  return jax.random.fold_in(jax.random.key(seed), 1000 + stage_index)


def enter_stage(prev: TrainState, prev_model: TransformerConfig, stage: Stage,
                fresh: TrainState, key: jax.Array) -> TrainState:
  """The state `stage` starts from, given the state the previous stage ended in
  and a freshly initialised state of the new model. A `prev` without optimizer
  state (params from another run, `train.init_from`) gets fresh moments.

  Each state is in its own model's layout (`model.scan_layers`); the transform
  and the overlays work on the unrolled layout (`moejax.layout`), and the
  result is in the new model's."""
  prev = layout.from_model(prev, prev_model)
  fresh = layout.from_model(fresh, stage.model)
  ctx_options = {}
  params_fn = lambda params, ctx: params  # noqa: E731
  moments_fn = None
  if stage.transform:
    transition, ctx_options = get_transition(stage.transform,
                                             dict(stage.transform_options))
    params_fn, moments_fn = transition.params, transition.moments
  ctx = TransitionContext(old=prev_model, new=stage.model, key=key,
                          options=ctx_options)
  params = overlay(fresh.params, params_fn(prev.params, ctx))
  carry = (lambda tree: moments_fn(tree, ctx)) if moments_fn else (lambda t: t)
  if prev.opt_state is None:
    opt_state = fresh.opt_state
  else:
    opt_state = carry_opt_state(prev.opt_state, prev.params, fresh.opt_state,
                                params, carry)
  model_state = overlay(fresh.model_state, prev.model_state)
  return layout.to_model(prev.replace(params=params, opt_state=opt_state,
                                      model_state=model_state), stage.model)


def check_frozen(stage: Stage, params) -> None:
  """Every frozen rule of `stage` must match at least one param."""
  for pattern in stage.frozen:
    if not count_matches(params, [pattern]):
      raise ConfigError(f"stage {stage.name!r} freezes {pattern!r}, which matches "
                        "no param of its model; fix the rule")

