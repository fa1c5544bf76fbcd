"""Every grouped matmul impl against the naive per-row loop: values, dlhs, drhs.

The Pallas kernels run in interpret mode on CPU (automatically for
impl="pallas") and compiled on a GPU. Shapes: M=37 rows, K=20, N=24, G=5, tiles
of 16 (Triton's smallest dot), so K and N pad to 32 (two K steps, two column
tiles, both ways round for dX) and most group sizes are not tile multiples.

Tolerances: float32 rtol = atol = 1e-5 (float32 accumulation in another order).
bfloat16 rtol = atol = 2e-2: inputs are exact bf16 values, accumulation is
float32, and each output/gradient is rounded once to bf16 (relative error
<= 2^-8 ~ 0.4%, |values| up to ~20 here), against a float64 reference.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.kernels import grouped_matmul, pallas_grouped_matmul
from moejax.kernels import megablox
from moejax.kernels.reference import (grouped_matmul_grads_loop,
                                      grouped_matmul_loop)

M, K, N, G = 37, 20, 24, 5
TILES = (16, 16, 16)
TOL = {"float32": 1e-5, "bfloat16": 2e-2}

CASES = {
    # Empty group, sizes not tile multiples, rows 33..36 past sum(sizes).
    "mixed": [9, 0, 17, 1, 6],
    "one_group": [0, 0, 37, 0, 0],
    "tile_multiples": [16, 0, 16, 5, 0],
    "all_empty": [0, 0, 0, 0, 0],
    "first_and_last": [20, 0, 0, 0, 17],
}

IMPLS = {
    "xla": functools.partial(grouped_matmul, impl="xla"),
    "pallas": functools.partial(grouped_matmul, impl="pallas", tiles=TILES),
    "pallas_default_tiles": functools.partial(grouped_matmul, impl="pallas"),
    "pallas_tpu": functools.partial(pallas_grouped_matmul, target="tpu",
                                    tiles=TILES, interpret=True),
    "megablox": functools.partial(grouped_matmul, impl="megablox"),
    "tiled": functools.partial(grouped_matmul, impl="tiled", tiles=TILES),
    "tiled_default_tiles": functools.partial(grouped_matmul, impl="tiled"),
}


@functools.cache
def _value_and_grads(impl: str):
  """jit of (out, dlhs, drhs) for cotangent dout; sizes are traced (one compile)."""
  fn = IMPLS[impl]

  def run(lhs_MI, rhs_GIO, sizes_G, dout_MO):
    out_MO, vjp = jax.vjp(lambda x, w: fn(x, w, sizes_G), lhs_MI, rhs_GIO)
    return (out_MO, *vjp(dout_MO))

  return jax.jit(run)


def _inputs(dtype: str, seed: int = 0):
  rng = np.random.default_rng(seed)
  lhs_MI = jnp.asarray(rng.normal(size=(M, K)), dtype)
  rhs_GIO = jnp.asarray(rng.normal(size=(G, K, N)), dtype)
  dout_MO = jnp.asarray(rng.normal(size=(M, N)), dtype)
  return lhs_MI, rhs_GIO, dout_MO


def _check(impl, dtype, sizes_G, seed=0):
  lhs_MI, rhs_GIO, dout_MO = _inputs(dtype, seed)
  sizes_G = jnp.asarray(sizes_G, jnp.int32)
  out_MO, dlhs_MI, drhs_GIO = _value_and_grads(impl)(lhs_MI, rhs_GIO, sizes_G,
                                                     dout_MO)
  assert out_MO.dtype == dlhs_MI.dtype == drhs_GIO.dtype == jnp.dtype(dtype)
  assert out_MO.shape == (M, N) and drhs_GIO.shape == (G, K, N)
  want_dlhs, want_drhs = grouped_matmul_grads_loop(lhs_MI, rhs_GIO, sizes_G,
                                                   dout_MO)
  tol = TOL[dtype]
  for got, want in [(out_MO, grouped_matmul_loop(lhs_MI, rhs_GIO, sizes_G)),
                    (dlhs_MI, want_dlhs), (drhs_GIO, want_drhs)]:
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol,
                               atol=tol)
  # Rows past the groups are exactly zero, and get exactly zero gradient.
  total = int(np.sum(sizes_G))
  assert not np.any(np.asarray(out_MO[total:])) and not np.any(
      np.asarray(dlhs_MI[total:]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_matches_loop(impl, dtype):
  if impl == "megablox" and (not megablox.is_available()
                             or jax.default_backend() == "gpu"):
    pytest.skip("megablox needs a TPU or the interpreter, and an importable "
                "jax.experimental.pallas.ops.tpu.megablox")
  for sizes_G in CASES.values():
    _check(impl, dtype, sizes_G)


def test_pallas_matches_ragged_dot_on_random_groups():
  rng = np.random.default_rng(1)
  lhs_MI, rhs_GIO, dout_MO = _inputs("float32", seed=2)
  for _ in range(4):
    total = int(rng.integers(0, M + 1))
    cuts = np.sort(rng.integers(0, total + 1, G - 1))
    sizes_G = jnp.asarray(np.diff(np.concatenate([[0], cuts, [total]])),
                          jnp.int32)
    got = _value_and_grads("pallas")(lhs_MI, rhs_GIO, sizes_G, dout_MO)
    want = _value_and_grads("xla")(lhs_MI, rhs_GIO, sizes_G, dout_MO)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_jax_grad_of_a_loss_under_jit():
  lhs_MI, rhs_GIO, _ = _inputs("float32")
  sizes_G = jnp.array(CASES["mixed"], jnp.int32)

  def loss(impl, x, w):
    return jnp.sum(grouped_matmul(x, w, sizes_G, impl=impl, tiles=TILES) ** 2)

  got = jax.jit(jax.grad(functools.partial(loss, "pallas"), (0, 1)))(lhs_MI,
                                                                      rhs_GIO)
  want = jax.grad(functools.partial(loss, "xla"), (0, 1))(lhs_MI, rhs_GIO)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_mixed_dtypes_promote_and_empty_shapes():
  lhs_MI, rhs_GIO, _ = _inputs("float32")
  sizes_G = jnp.array(CASES["mixed"], jnp.int32)
  for impl in ("xla", "pallas"):
    out = jax.eval_shape(functools.partial(grouped_matmul, impl=impl),
                         lhs_MI.astype(jnp.bfloat16), rhs_GIO, sizes_G)
    assert out.dtype == jnp.float32 and out.shape == (M, N)
  empty = grouped_matmul(jnp.zeros((0, K)), rhs_GIO, sizes_G * 0, impl="pallas")
  assert empty.shape == (0, N)
