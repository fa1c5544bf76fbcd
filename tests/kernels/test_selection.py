"""Choosing an impl: the registry, `MoELayer.matmul`, and that the real kernels lower.

The lowering tests compile nothing: they trace the kernels for CUDA (Triton)
and TPU (Mosaic) on this CPU, which checks block shapes, power-of-two tiles
and supported ops for the hardware paths we cannot run here.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.errors import ConfigError
from moejax.kernels import (MATMUL_IMPLS, available_impls, check_impl,
                            grouped_matmul, megablox, pallas_grouped_matmul,
                            resolve_impl)
from moejax.moe import MoELayer
from moejax.moe.experts import Experts, grouped_ffn


def test_unknown_impl_is_a_config_error_listing_valid_ones():
  with pytest.raises(ConfigError, match="'triton'.*auto, xla, pallas, megablox"):
    grouped_matmul(jnp.ones((4, 2)), jnp.ones((1, 2, 3)), jnp.array([4]),
                   impl="triton")
  with pytest.raises(ConfigError, match="valid: auto"):
    check_impl("XLA")


def test_auto_picks_per_platform():
  assert resolve_impl("auto", "gpu") == "pallas"
  assert resolve_impl("auto", "tpu") == "megablox"
  assert resolve_impl("auto", "cpu") == "tiled"
  assert resolve_impl("pallas", "cpu") == "pallas"
  assert set(available_impls("cpu")) <= set(MATMUL_IMPLS)


D, F, E = 8, 16, 4


def _experts_apply(matmul: str):
  x_MD = jax.random.normal(jax.random.key(1), (13, D))
  sizes_E = jnp.array([3, 0, 6, 2], jnp.int32)  # 11 rows used, 2 past the end.
  # The same params for every impl (and no eager run of an interpreted kernel).
  params = nn.unbox(jax.jit(Experts(E, D, F).init)(jax.random.key(0)))["params"]
  ragged_dot = functools.partial(grouped_matmul, impl=matmul)

  def loss(p, x):
    y_MD = grouped_ffn(x, p["w_in"], p["w_out"], sizes_E, ragged_dot=ragged_dot)
    return jnp.sum(jnp.sin(y_MD)), y_MD

  (_, y_MD), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
      params, x_MD)
  return y_MD, grads


def test_experts_grouped_pallas_equals_xla():
  y_xla, grads_xla = _experts_apply("xla")
  y_pallas, grads_pallas = _experts_apply("pallas")
  np.testing.assert_allclose(y_pallas, y_xla, rtol=1e-5, atol=1e-6)
  assert not np.any(np.asarray(y_pallas[11:]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               grads_pallas, grads_xla)


def test_layer_unknown_matmul_fails_on_any_path():
  layer = MoELayer("switch", num_experts=E, d_ff=F, matmul="cuda")
  with pytest.raises(ConfigError, match="unknown grouped matmul impl 'cuda'"):
    layer.init(jax.random.key(0), jnp.ones((1, 2, D)))  # Capacity path.


def _lower(fn, platform: str):
  """Lowers fwd + both grads of fn for `platform` without running anything."""
  lhs_MI = jnp.zeros((256, 128), jnp.bfloat16)
  rhs_GIO = jnp.zeros((4, 128, 256), jnp.bfloat16)
  sizes_G = jnp.array([100, 0, 120, 3], jnp.int32)

  def run(x, w, s, dout):
    out, vjp = jax.vjp(lambda x, w: fn(x, w, s), x, w)
    return (out, *vjp(dout))

  args = (lhs_MI, rhs_GIO, sizes_G, jnp.zeros((256, 256), jnp.bfloat16))
  if platform != "cuda":
    return jax.jit(run).trace(*args).lower(lowering_platforms=(platform,))
  # Triton asks for the GPU's compute capability: name an abstract H100.
  mesh = jax.sharding.AbstractMesh(
      (1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
          "NVIDIA H100", None, "cuda"))
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.jit(run).trace(*args).lower(lowering_platforms=(platform,))


@pytest.mark.parametrize("target,platform,call", [
    ("gpu", "cuda", "gpu.triton"), ("tpu", "tpu", "tpu_custom_call")])
def test_pallas_kernels_lower_for_hardware(target, platform, call):
  lowered = _lower(lambda x, w, s: pallas_grouped_matmul(
      x, w, s, target=target, interpret=False), platform)
  assert lowered.as_text().count(call) == 3  # gmm, gmm (dX), tgmm (dW).


def test_megablox_lowers_for_tpu():
  if not megablox.is_available():
    pytest.skip("megablox is not importable in this jax")
  lowered = _lower(lambda x, w, s: megablox.megablox_grouped_matmul(
      x, w, s, interpret=False), "tpu")
  assert lowered.as_text().count("tpu_custom_call") == 3
