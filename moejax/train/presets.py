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


# The papers' language models at their own size (configs/paper/). StableMoE
# (Dai et al. 2022, Table 2): one MoE block after the middle block, experts of
# `expert_depth` stacked FFN sublayers, sequences of 1,024, 512K tokens per
# step, 60K steps of which 6K are stage 1. EvoMoE's GPT-MoE (its scripts'
# `transformer_lm_gptsmall_moe`, `--moe-freq 2`): every other FFN an MoE.
PAPER_SEQ_LEN = 1024
PAPER_BATCH = 512  # Sequences per optimizer step: 512 x 1,024 = 524,288 tokens.
PAPER_STEPS = 60_000
STABLEMOE_STAGE1_FRACTION = 0.1  # 6K of 60K steps.
PAPER_SIZES = {  # model.size: (experts, expert depth, peak learning rate).
    "base": (32, 3, 6e-4), "large": (64, 6, 3e-4)}
STABLEMOE_ROWS = ("dense", "switch", "base", "hash", "stablemoe")
GPT_MOE_ROWS = ("evomoe", "switch")
PAPER_SOURCE = "tfds:c4/en"  # Any prepared text TFDS dataset (data.source).
PAPER_VOCAB = 50_304  # GPT-2's 50,257 BPE rounded up to a multiple of 128.
EVOMOE_PAPER_ACCUM = 8  # Micro-batches per step: 1 sequence per chip each.
# Large size: params and moments sharded (FSDP) and the step's 8 sequences per
# chip in micro-batches, to fit 16 GiB per chip (benchmarks/RESULTS.md, "Paper
# configs at their size": 20.6 GiB replicated in one pass, StableMoE large).
LARGE_PAPER_ACCUM = 2
BASE_LAYER_LARGE_ACCUM = 4  # BASE's assignment: 27 GiB of temporaries in one.


def _pod_defaults(c: ml_collections.ConfigDict, size: str) -> None:
  """The paper-size shape, data, schedule and the layout a pod needs: scanned
  blocks, per-block remat, bf16, one expert (or a group) per chip."""
  experts, _, lr = PAPER_SIZES[size]
  c.model.size, c.model.num_experts = size, experts
  c.model.scan_layers, c.model.remat, c.model.dtype = True, "full", "bfloat16"
  # Up to E chips split the experts; the rest of the pod splits the batch
  # (64 chips at base: 2 x 32). On fewer chips set mesh.expert to the count.
  c.mesh.data, c.mesh.expert = -1, experts
  c.data.source, c.data.seq_len = PAPER_SOURCE, PAPER_SEQ_LEN
  c.data.vocab_size, c.data.max_bytes = PAPER_VOCAB, None
  c.train.batch_size = PAPER_BATCH  # 8 sequences per chip on 64 chips.
  c.train.log_every, c.train.probe_every = 100, 2000
  c.train.eval_every = c.train.checkpoint_every = 2000
  # GPT-3's peak rate for the size and fairseq's Adam betas (the papers'
  # learning rates are not in their text).
  c.optim.learning_rate, c.optim.warmup_steps, c.optim.b2 = lr, 2000, 0.98


def paper_config(paper: str, method: str, size: str = "base"
                 ) -> ml_collections.ConfigDict:
  """A row of a paper's LM experiment: `paper` `stablemoe` (method one of
  STABLEMOE_ROWS, size `base` or `large`) or `gpt_moe` (GPT_MOE_ROWS, base)."""
  rows = {"stablemoe": STABLEMOE_ROWS, "gpt_moe": GPT_MOE_ROWS}
  if paper not in rows or method not in rows[paper]:
    raise ConfigError(f"no paper config {paper}/{method}; valid: " + ", ".join(
        f"{p}/{m}" for p, ms in rows.items() for m in ms))
  if size not in PAPER_SIZES or (paper == "gpt_moe" and size != "base"):
    raise ConfigError(f"no {paper} config at size {size!r}")
  c = method_config(method, steps=PAPER_STEPS)
  _pod_defaults(c, size)
  if method == "evomoe":
    # DTS's soft phase sends a token to up to all E experts: 8 sequences per
    # chip need 77 GiB of temporaries, one per micro-step 11.5 (measured by
    # benchmarks/scale.py on 8 simulated devices as 1 x 8).
    c.train.grad_accum_steps = EVOMOE_PAPER_ACCUM
  if size == "large" and method != "dense":
    c.mesh.shard_params = True
    c.train.grad_accum_steps = (BASE_LAYER_LARGE_ACCUM if method == "base"
                                else LARGE_PAPER_ACCUM)
  if paper == "stablemoe":
    if method == "dense":
      c.model.moe_layers = "none"
    else:
      c.model.moe_layers, c.model.expert_depth = "middle", PAPER_SIZES[size][1]
    if method == "stablemoe":
      c.stages[0].fraction = STABLEMOE_STAGE1_FRACTION
  return c


# The StableMoE paper's translation experiment (Table 3): WMT X -> En, a 6 + 6
# block encoder-decoder of D = 512 (Transformer-base), 32 experts in two MoE
# blocks (after encoder block 3 and decoder block 3), SentencePiece 64K,
# 352K steps, 30K of them StableMoE's stage 1.
MT_ROWS = ("dense", "switch", "base", "hash", "stablemoe")
MT_STEPS = 352_000
MT_STAGE1_STEPS = 30_000
MT_EXPERTS = 32
MT_MOE_BLOCK = "middle"  # Block 3 of 6.
MT_SOURCE = "tfds:wmt14_translate/de-en"  # Any TFDS translate dataset.
MT_LANGUAGES = "de,en"  # Source, target: X -> En.
MT_VOCAB = 64_000
MT_LEN = 128  # Source and target tokens per packed row.
MT_BATCH = 512  # Rows per step (the paper's batch is not in its text).


def mt_paper_config(method: str) -> ml_collections.ConfigDict:
  """A row of the StableMoE paper's translation table (method one of
  MT_ROWS) on a TFDS translate dataset."""
  if method not in MT_ROWS:
    raise ConfigError(f"no translation paper config {method!r}; valid: "
                      f"{', '.join(MT_ROWS)}")
  c = method_config(method, steps=MT_STEPS)
  c.model.arch, c.model.size = "encdec", "transformer_base"
  c.model.num_experts = MT_EXPERTS
  c.model.moe_layers = "none" if method == "dense" else MT_MOE_BLOCK
  c.model.encoder_moe_layers = c.model.moe_layers
  # Unrolled blocks (encdec has no scanned layout), per-block remat, bf16.
  c.model.remat, c.model.dtype = "full", "bfloat16"
  c.mesh.data, c.mesh.expert = -1, MT_EXPERTS
  c.data.task, c.data.source, c.data.languages = "seq2seq", MT_SOURCE, MT_LANGUAGES
  c.data.seq_len = c.data.target_len = MT_LEN
  c.data.vocab_size, c.data.max_bytes = MT_VOCAB, None
  c.data.overlong = "truncate"
  c.train.batch_size, c.train.label_smoothing = MT_BATCH, 0.1
  c.train.log_every, c.train.probe_every = 100, 2000
  c.train.eval_every = c.train.checkpoint_every = 2000
  # fairseq's Transformer recipe: Adam (0.9, 0.98), peak 7e-4 after 4K steps.
  c.optim.learning_rate, c.optim.warmup_steps, c.optim.b2 = 7e-4, 4000, 0.98
  if method == "stablemoe":
    c.stages[0].fraction = MT_STAGE1_STEPS / MT_STEPS
  return c
