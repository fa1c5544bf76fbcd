"""Forward+backward time of one MoE layer per dispatch path vs a dense FFN.

The dense reference pushes T*k tokens through one FFN of the same D and F, i.e.
the same active FLOPs; ratio = dense time / MoE time (1.0 is the upper limit).
Paths: `capacity`, and `dropless/<impl>` for each grouped matmul impl given by
`--matmul` (default: every impl available here, see `moejax.kernels`).

  python benchmarks/moe_layer.py            # T=16384 D=1024 F=4096, bf16
  python benchmarks/moe_layer.py --small    # seconds on a CPU
  python benchmarks/moe_layer.py --paths dropless --matmul xla pallas

Each configuration is checked against the naive per-token loop on a sample of
tokens before it is timed. On CPU, pallas and megablox run in the Pallas
interpreter: their rows show that the kernels run, not how fast they are.
"""

import argparse
import itertools
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.kernels import MATMUL_IMPLS, available_impls, resolve_impl
from moejax.models.transformer import DenseFFN
from moejax.moe import MoELayer, dispatch, expert_capacity
from moejax.moe.reference import capacity_keep_loop, moe_loop
from moejax.routing import make_router

def _layer(top_k, num_experts, d_ff, path, capacity_factor, dtype):
  """The top-k MoE layer for `path` (`capacity` or `dropless/<impl>`)."""
  dispatch_path, _, matmul = path.partition("/")
  return MoELayer("topk", num_experts=num_experts, d_ff=d_ff, top_k=top_k,
                  dispatch=dispatch_path, capacity_factor=capacity_factor,
                  dtype=dtype, matmul=matmul or "xla")


def _time(fn, *args, iters: int) -> float:
  """Median seconds of `fn(*args)` after a compile-and-warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _fwd_bwd(apply_fn):
  """jit of grad w.r.t. params and input of sum(output * cotangent)."""
  def loss(params, x, ct):
    return jnp.sum(apply_fn(params, x).astype(jnp.float32) * ct)
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _check(layer, params, x_TD, top_k, path, capacity_factor, sample=16):
  """The layer's output on `sample` tokens equals the naive per-token loop."""
  num_experts = layer.num_experts
  y_TD = jax.jit(layer.apply)({"params": params}, x_TD[None])[0][0]
  router = make_router("topk", num_experts=num_experts, top_k=top_k)
  routing = router.apply({"params": params["router"]}, x_TD)
  capacity = (expert_capacity(x_TD.shape[0], num_experts, top_k, capacity_factor)
              if path == "capacity" else None)
  kept = capacity_keep_loop(routing.expert_TK, routing.mask_TK, num_experts,
                            capacity)[:sample]
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  w = params["experts"]
  want = moe_loop(f32(x_TD[:sample]), routing.expert_TK[:sample],
                  routing.weight_TK[:sample], kept, f32(w["w_in"]), f32(w["w_out"]))
  tol = 5e-2 if layer.dtype == jnp.bfloat16 else 1e-4
  np.testing.assert_allclose(f32(y_TD[:sample]), want, rtol=tol, atol=tol)


def run(tokens, d_model, d_ff, experts, top_ks, dtype, capacity_factor, iters,
        paths):
  rows = []
  key = jax.random.key(0)
  x_TD = jax.random.normal(key, (tokens, d_model), jnp.float32).astype(dtype)
  for num_experts, top_k in itertools.product(experts, top_ks):
    dense = DenseFFN(d_ff, dtype=dtype)
    x_dense = jnp.tile(x_TD, (top_k, 1))[None]
    dparams = nn.unbox(dense.init(key, x_dense))["params"]
    dense_step = _fwd_bwd(lambda p, x: dense.apply({"params": p}, x))
    ct = jax.random.normal(key, x_dense.shape, jnp.float32)
    dense_s = _time(dense_step, dparams, x_dense, ct, iters=iters)
    flops = 6 * 2 * tokens * top_k * d_model * d_ff  # fwd 2 matmuls x3 for bwd.
    rows.append(dict(E=num_experts, k=top_k, path="dense", ms=dense_s * 1e3,
                     tflops=flops / dense_s / 1e12, ratio=1.0))
    for path in paths:
      layer = _layer(top_k, num_experts, d_ff, path, capacity_factor, dtype)
      params = nn.unbox(jax.jit(layer.init)(key, x_TD[None]))["params"]
      _check(layer, params, x_TD, top_k, path, capacity_factor)
      step = _fwd_bwd(lambda p, x, layer=layer: layer.apply({"params": p}, x)[0])
      ct = jax.random.normal(key, (1, tokens, d_model), jnp.float32)
      moe_s = _time(step, params, x_TD[None], ct, iters=iters)
      rows.append(dict(E=num_experts, k=top_k, path=path, ms=moe_s * 1e3,
                       tflops=flops / moe_s / 1e12, ratio=dense_s / moe_s))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true",
                      help="T=1024 D=64 F=256 E={4,8}, float32: seconds on CPU")
  parser.add_argument("--tokens", type=int, default=16384)
  parser.add_argument("--d-model", type=int, default=1024)
  parser.add_argument("--d-ff", type=int, default=4096)
  parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 64])
  parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--capacity-factor", type=float, default=1.25)
  parser.add_argument("--paths", nargs="+", default=["capacity", "dropless"],
                      choices=list(dispatch.DISPATCH_PATHS))
  parser.add_argument("--matmul", nargs="+", choices=MATMUL_IMPLS,
                      help="grouped matmul impls for the dropless path "
                           "(default: all available here)")
  parser.add_argument("--iters", type=int, default=20)
  args = parser.parse_args()
  if args.small:
    args.tokens, args.d_model, args.d_ff = 1024, 64, 256
    args.experts, args.dtype, args.iters = [4, 8], "float32", 5
  impls = dict.fromkeys(resolve_impl(m) for m in
                        (args.matmul or available_impls()))
  paths = [p for path in args.paths for p in
           ([f"dropless/{m}" for m in impls] if path == "dropless" else [path])]
  print(f"# device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"jax {jax.__version__}; T={args.tokens} D={args.d_model} "
        f"F={args.d_ff} {args.dtype} cf={args.capacity_factor}")
  if jax.default_backend() == "cpu" and {"pallas", "megablox"} & set(impls):
    print("# note: pallas/megablox run in the Pallas interpreter on CPU; their "
          "times are not kernel performance")
  rows = run(args.tokens, args.d_model, args.d_ff, args.experts, args.top_k,
             jnp.dtype(args.dtype), args.capacity_factor, args.iters, paths)
  print("| E | k | path | ms | TFLOP/s | dense/MoE |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['E']} | {r['k']} | {r['path']} | {r['ms']:.2f} | "
          f"{r['tflops']:.3f} | {r['ratio']:.2f} |")


if __name__ == "__main__":
  main()
