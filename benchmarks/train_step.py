"""Training-step throughput of a GPT-MoE against its dense counterpart, one process.

The dense model is GPT-2-small shaped: 12 layers, D=768, 12 heads, F=3072,
V=50304, L=1024. The MoE model replaces every other FFN (blocks 1, 3, ...) with
E=32 experts under top-k routing, each expert of width F/k: every token's
active FFN parameters and FLOPs equal the dense model's, so the dense step is
the reference (target: MoE step <= 1.2x dense, PERF.md).

Model FLOPs per token (PaLM-style; causal attention counted as full):
  6 * active matmul params + 12 * layers * D * L, where the active matmul
  params are layers * 4 D^2 (attention) + V * D (logits) + dense FFNs * 2 D F
  + MoE FFNs * (k * 2 D F/k + D E).
MFU = model FLOP/s / peak; peak from --peak-tflops or the bf16 dense peak of
known devices (none on CPU).

  python benchmarks/train_step.py                 # GPU/TPU, bf16
  python benchmarks/train_step.py --small         # seconds on a CPU
  python benchmarks/train_step.py --paths dropless --matmul xla pallas

On CPU, pallas runs in the Pallas interpreter: its rows show that the kernel
trains, not how fast it is. `loss@1` is the first step's loss: MoE rows with
the same dispatch path start from the same params and must agree across impls.
"""

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax.kernels import MATMUL_IMPLS, available_impls, resolve_impl
from moejax.models import MoEConfig, TransformerConfig, TransformerLM
from moejax.models.config import resolve_moe_layers
from moejax.train import OptimizerConfig, init_state, make_optimizer
from moejax.train import make_train_step

# Dense bf16 peak TFLOP/s by device-kind substring (vendor datasheets).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0,
               "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
               "TPU v6": 918.0}

def flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
  """Model FLOPs of one training token (fwd + bwd), see the module docstring."""
  d, layers = cfg.d_model, cfg.num_layers
  num_moe = len(cfg.moe_layers)
  moe = cfg.moe
  expert_ff = moe.d_ff or cfg.d_ff
  active = (layers * 4 * d * d + cfg.vocab_size * d
            + (layers - num_moe) * 2 * d * cfg.d_ff
            + num_moe * (moe.top_k * 2 * d * expert_ff + d * moe.num_experts))
  return 6.0 * active + 12.0 * layers * d * seq_len


def _batches(key, num, batch, seq_len, vocab):
  tokens = jax.random.randint(key, (num, batch, seq_len + 1), 0, vocab, jnp.int32)
  return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens]


def measure(cfg: TransformerConfig, batch: int, seq_len: int, iters: int
            ) -> dict:
  """Median step seconds, first-step loss and param count of one model."""
  model = TransformerLM(cfg)
  tx = make_optimizer(OptimizerConfig(), total_steps=1000)
  key = jax.random.key(0)
  state = jax.jit(init_state, static_argnums=(0, 1, 3))(model, tx, key, seq_len)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  step = jax.jit(make_train_step(model, tx, key), donate_argnums=0)
  batches = _batches(jax.random.key(1), 4, batch, seq_len, cfg.vocab_size)
  state, metrics = step(state, batches[0])  # Compiles.
  loss = float(metrics["train/loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(f"first-step loss {loss}")
  times = []
  for i in range(iters):
    start = time.perf_counter()
    state, metrics = step(state, batches[(i + 1) % len(batches)])
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return dict(seconds=statistics.median(times), loss=loss, params=num_params)


def run(args) -> list[dict]:
  base = TransformerConfig(
      vocab_size=args.vocab, max_len=args.seq_len, num_layers=args.layers,
      d_model=args.d_model, num_heads=args.heads, d_ff=args.d_ff,
      dtype=args.dtype)
  variants = [("dense", "-", "-", 0, base)]
  impls = dict.fromkeys(resolve_impl(m) for m in
                        (args.matmul or available_impls()))
  moe_layers = resolve_moe_layers(args.moe_layers, args.layers)
  for top_k in args.top_k:
    for path in args.paths:
      for impl in (impls if path == "dropless" else ["-"]):
        moe = MoEConfig(num_experts=args.experts, top_k=top_k, router="topk",
                        dispatch=path, capacity_factor=args.capacity_factor,
                        d_ff=args.d_ff // top_k,
                        matmul=impl if impl != "-" else "xla")
        cfg = dataclasses.replace(base, moe_layers=moe_layers, moe=moe)
        variants.append(("moe", path, impl, top_k, cfg))
  rows = []
  tokens = args.batch * args.seq_len
  for kind, path, impl, top_k, cfg in variants:
    r = measure(cfg, args.batch, args.seq_len, args.iters)
    tflops = flops_per_token(cfg, args.seq_len) * tokens / r["seconds"] / 1e12
    rows.append(dict(model=kind, k=top_k or "-", path=path, matmul=impl,
                     tflops=tflops, tokens_s=tokens / r["seconds"], **r))
  return rows


def _peak(args) -> float | None:
  if args.peak_tflops:
    return args.peak_tflops
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true",
                      help="2 layers, D=64, E=4, V=256, B=4 x L=64, float32")
  parser.add_argument("--layers", type=int, default=12)
  parser.add_argument("--d-model", type=int, default=768)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--d-ff", type=int, default=3072)
  parser.add_argument("--vocab", type=int, default=50304)
  parser.add_argument("--seq-len", type=int, default=1024)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--experts", type=int, default=32)
  parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
  parser.add_argument("--moe-layers", default="every_other")
  parser.add_argument("--capacity-factor", type=float, default=1.25)
  parser.add_argument("--paths", nargs="+", default=["capacity", "dropless"],
                      choices=["capacity", "dropless"])
  parser.add_argument("--matmul", nargs="+", choices=MATMUL_IMPLS,
                      help="grouped matmul impls for the dropless path "
                           "(default: all available here)")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="device peak for MFU (default: known bf16 peaks)")
  args = parser.parse_args()
  if args.small:
    args.layers, args.d_model, args.heads, args.d_ff = 2, 64, 4, 256
    args.vocab, args.seq_len, args.batch, args.experts = 256, 64, 4, 4
    args.dtype, args.iters = "float32", 5
  peak = _peak(args)
  print(f"# device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"jax {jax.__version__}; layers={args.layers} D={args.d_model} "
        f"F={args.d_ff} E={args.experts} (expert F/k) V={args.vocab} "
        f"B={args.batch} L={args.seq_len} {args.dtype}; "
        f"peak={peak or 'unknown'} TFLOP/s")
  if jax.default_backend() == "cpu":
    print("# note: on CPU pallas runs in the Pallas interpreter; its times are "
          "not kernel performance")
  rows = run(args)
  dense_s = rows[0]["seconds"]
  print("| model | k | path | matmul | params | step ms | tokens/s | TFLOP/s "
        "| MFU | step/dense | loss@1 |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    mfu = f"{r['tflops'] / peak:.1%}" if peak else "n/a"
    print(f"| {r['model']} | {r['k']} | {r['path']} | {r['matmul']} | "
          f"{r['params'] / 1e6:.2f}M | {r['seconds'] * 1e3:.1f} | "
          f"{r['tokens_s']:,.0f} | {r['tflops']:.3f} | {mfu} | "
          f"{r['seconds'] / dense_s:.2f} | {r['loss']:.4f} |")


if __name__ == "__main__":
  main()
