"""One base model, every routing method: the configs of the router comparison.

All methods share the model (4 blocks, D=128, MoE in blocks 1 and 3, 8 experts,
except DeepSeek-style fine-grained experts), the data, the batch and the step
budget. Active FFN FLOPs per token are equal to the dense model's
(`model.equal_flops`): top-1
methods use experts of the dense width F, top-2 uses F/2 (two experts per
token), DeepSeek-style 3 routed + 1 shared experts of width F/4. EvoMoE's soft
phase, DSelect-k's early phase and ReMoE's dense start use several experts per
token, as in their papers; their dropless path runs the platform's grouped
matmul (`model.matmul=auto`), and they pay for the slots a batch uses
(`moejax.moe.budgets`). StableMoE and EvoMoE follow the reference code's
settings, the authors' published commands (docs/fidelity.md).

The Switch-form aux loss of `switch` and `topk` is per micro-batch, with
MICRO_BATCHES micro-batches (4 of 4 sequences at batch 16, as on 4
data-parallel devices), so that `qwen` (the same top-2 router with the
global-batch loss) differs from `topk` on a single device too.
"""

import ml_collections

from moejax.errors import ConfigError
from moejax.train.config import default_config, stage_config

ROUTERS = ("switch", "topk", "expert_choice", "base", "hash", "dselect_k")
MODERN = ("deepseek", "qwen", "remoe")
METHODS = ("dense",) + ROUTERS + ("stablemoe", "evomoe", "upcycle") + MODERN
MICRO_BATCHES = 4
# EvoMoE: the gate-loss weight of the authors' balanced script (per MoE layer)
# and the final temperature that makes the soft phase sparse (docs/fidelity.md).
EVOMOE_GATE_LOSS_WT = 0.0
EVOMOE_TAU_MIN = 0.1


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
    _router(c, "switch", aux_loss_coef=0.01, z_loss_coef=1e-3, jitter=0.0,
            micro_batches=MICRO_BATCHES)
  elif method in ("topk", "qwen"):
    # Qwen (Qiu et al. 2025): the same router with the global-batch loss.
    balance = dict(balance="global") if method == "qwen" else dict(
        micro_batches=MICRO_BATCHES)
    _router(c, "topk", aux_loss_coef=0.01, z_loss_coef=1e-3, **balance)
    c.model.top_k = 2  # Experts of width F/2 (model.equal_flops).
  elif method == "deepseek":
    # DeepSeekMoE / DeepSeek-V3: 4x finer experts (32 of width F/4), 3 routed
    # + 1 shared per token; sigmoid scores, normalised gates, aux-loss-free
    # bias (u = 1e-3) and a tiny sequence-wise loss (alpha = 1e-4).
    _router(c, "topk", score="sigmoid", renormalize=True, routed_scaling=1.0,
            balance="bias+sequence", bias_rate=1e-3, aux_loss_coef=1e-4,
            z_loss_coef=0.0)
    c.model.num_experts = 32
    c.model.top_k = 3
    c.model.num_shared_experts = 1  # Width F // (3 + 1) by the FLOPs rule.
  elif method == "remoe":
    # ReMoE (Wang et al. 2025): ReLU gates, lambda_0 = 1e-8, alpha = 1.2,
    # target sparsity 1 - 1/8.
    _router(c, "remoe", l1_coef_init=1e-8, l1_alpha=1.2)
    c.model.dispatch = "dropless"
    c.model.matmul = "auto"
  elif method == "expert_choice":
    _router(c, "expert_choice", capacity_factor=1.0)
  elif method == "base":
    _router(c, "base")
  elif method == "hash":
    _router(c, "hash", balance="frequency")
  elif method == "dselect_k":
    _router(c, "dselect_k", gamma=1.0, entropy_reg=1e-2)
    c.model.dispatch = "dropless"
    c.model.matmul = "auto"
  elif method == "stablemoe":
    _router(c, "stablemoe", distill_dim=50)
    # The reference trains with capacity factor 2: in stage 2 the frozen router
    # cannot rebalance, and 1.25 dropped 16% of the slots.
    c.model.capacity_factor = 2.0
    c.stages = [stage_config("distill", fraction=0.2),
                stage_config("frozen", transform="freeze_distilled_router",
                             model={"router_options": {"stage": 2}})]
  elif method == "evomoe":
    # The authors' published commands, not fairseq's class defaults. Gate
    # loss: none, as their DTS scripts (`--criterion cross_entropy`); their
    # balanced script's `--moe-gate-loss-wt 0.01 --moe-gate-loss-combine-method
    # sum` (aux_loss_coef=0.01: moejax sums over layers) held the gate near
    # uniform at 1000 steps (entropy 0.976 log E against 0.729 without, valid
    # PPL worse at each of 3 seeds: docs/fidelity.md). `--gumbel-decay-
    # scheduler Linear` from the balanced script. tau_max 1.0 and threshold
    # 1e-3 are the code's defaults; tau_min 0.1 (the code's 0.5 leaves 6.4 of 8
    # experts per token above the threshold, 0.1 about 1.8 for a uniform gate)
    # makes the soft phase go from dense to sparse.
    _router(c, "dts", tau_max=1.0, tau_min=EVOMOE_TAU_MIN, schedule="linear",
            anneal_steps=steps // 2, hard_step=int(steps * 0.6),
            combine="softmax", balance="reference",
            aux_loss_coef=EVOMOE_GATE_LOSS_WT)
    c.model.dispatch = "dropless"
    c.model.matmul = "auto"
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
