"""One base model, every routing method: the configs of the router comparison.

All methods share the model (4 blocks, D=128, MoE in blocks 1 and 3, 8 experts),
the data, the batch and the step budget. Active FFN FLOPs per token are equal to
the dense model's (`model.equal_flops`): top-1 methods use experts of the dense
width F, top-2 uses F/2 (two experts per token). EvoMoE's soft phase and
DSelect-k's early phase use several experts per token, as in their papers.
"""

import ml_collections

from moejax.errors import ConfigError
from moejax.train.config import default_config, stage_config

ROUTERS = ("switch", "topk", "expert_choice", "base", "hash", "dselect_k")
METHODS = ("dense",) + ROUTERS + ("stablemoe", "evomoe", "upcycle")


def base_config(steps: int = 600) -> ml_collections.ConfigDict:
  """The shared model, data and schedule (the quickstart's, with probes)."""
  c = default_config()
  c.train.steps = steps
  c.train.batch_size = 16
  c.train.log_every = 20
  c.train.eval_every = 100
  c.train.checkpoint_every = 200
  c.train.probe_every = 20
  c.model.moe_layers = "every_other"
  c.model.num_experts = 8
  c.model.top_k = 1
  return c


def _router(c, name: str, **options):
  c.model.router = name
  c.model.router_options = options
  return c


def method_config(method: str, steps: int = 600) -> ml_collections.ConfigDict:
  """The config of `method` (one of METHODS) on the shared base."""
  c = base_config(steps)
  if method == "dense":
    c.model.moe_layers = "none"
  elif method == "switch":
    _router(c, "switch", aux_loss_coef=0.01, z_loss_coef=1e-3, jitter=0.0)
  elif method == "topk":
    _router(c, "topk", aux_loss_coef=0.01, z_loss_coef=1e-3)
    c.model.top_k = 2  # Experts of width F/2 (model.equal_flops).
  elif method == "expert_choice":
    _router(c, "expert_choice", capacity_factor=1.0)
  elif method == "base":
    _router(c, "base")
  elif method == "hash":
    _router(c, "hash", balance="frequency")
  elif method == "dselect_k":
    _router(c, "dselect_k", gamma=1.0, entropy_reg=1e-2)
    c.model.dispatch = "dropless"
  elif method == "stablemoe":
    _router(c, "stablemoe", distill_dim=50)
    c.stages = [stage_config("distill", fraction=0.2),
                stage_config("frozen", transform="freeze_distilled_router",
                             model={"router_options": {"stage": 2}})]
  elif method == "evomoe":
    _router(c, "dts", tau_max=1.0, tau_min=0.5, anneal_steps=steps // 2,
            hard_step=int(steps * 0.6))
    c.model.dispatch = "dropless"
    c.stages = [stage_config("dense", fraction=0.25, model={"moe_layers": "none"}),
                stage_config("dts", transform="diversify",
                             transform_options={"mask_ratio": 0.2})]
  elif method == "upcycle":
    _router(c, "switch")
    c.stages = [stage_config("dense", fraction=0.5, model={"moe_layers": "none"}),
                stage_config("upcycled", transform="upcycle")]
  else:
    raise ConfigError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
  return c
