"""The MoE layer from Flax NNX: no special context, nnx.jit + value_and_grad,
a mesh, and the `router` rng stream."""

import dataclasses

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import nnx as moe_nnx
from moejax.errors import ConfigError
from moejax.moe import MoELayer
from moejax.moe.ffn_init import FFNInit
from moejax.parallel import MeshConfig, make_mesh

B, L, D, F, E = 8, 4, 16, 32, 4
KW = dict(num_experts=E, d_ff=F, router="topk", top_k=2,
          router_options={"jitter": 0.1}, dispatch="dropless")


def _linen_params(module) -> dict:
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))["moe"]


def _loss(y_BLD, aux):
  return jnp.sum(y_BLD ** 2) + aux.aux_loss


def test_nnx_layer_is_the_linen_layer():
  """Same params -> same output and gradients as moejax.moe.MoELayer."""
  model = moe_nnx.MoELayer(D, **KW, rngs=nnx.Rngs(params=0, router=1))
  x_BLD = jax.random.normal(jax.random.key(2), (B, L, D))
  params = _linen_params(model)
  assert params["experts"]["w_in"].shape == (E, D, F)
  linen = MoELayer(**KW)

  @nnx.jit
  def nnx_value_and_grad(model, x_BLD):
    return nnx.value_and_grad(lambda m: _loss(*m(x_BLD)))(model)

  value, grads = nnx_value_and_grad(model, x_BLD)
  want, want_grads = jax.value_and_grad(
      lambda p: _loss(*linen.apply({"params": p}, x_BLD)))(params)
  np.testing.assert_allclose(value, want, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(grads)["moe"]),
                  jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_every_linen_field_is_accepted_and_forwarded():
  """The NNX layer takes the linen layer's fields (derived, so they cannot
  drift): each set here away from its default reaches the wrapped layer."""
  mesh = make_mesh(MeshConfig(data=2, expert=4), num_experts=E)
  values = dict(
      router="topk", num_experts=E, d_ff=F, dispatch="dropless",
      capacity_factor=2.0, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
      matmul="auto", mesh=mesh, top_k=2, router_options={"jitter": 0.1},
      vocab_size=50, num_shared_experts=1, ffn_init=FFNInit("normal"),
      expert_depth=2)
  linen_fields = {f.name for f in dataclasses.fields(MoELayer)} - {"parent",
                                                                   "name"}
  assert set(values) == linen_fields == set(moe_nnx.LAYER_FIELDS)
  defaults = MoELayer("switch", num_experts=1, d_ff=1)
  assert all(values[k] != getattr(defaults, k)
             for k in linen_fields - {"router", "num_experts", "d_ff"})
  model = moe_nnx.MoELayer(D, **values, rngs=nnx.Rngs(0))
  layer = model.moe.to_nnx__module
  for key, value in values.items():
    assert getattr(layer, key) == value, key
  params = _linen_params(model)
  assert params["shared_experts"]["w_in"].shape == (1, D, F)
  assert params["experts"]["w_in"].dtype == jnp.bfloat16
  with pytest.raises(ConfigError, match="has no argument d_model_typo; valid: "
                     "router, num_experts"):
    moe_nnx.MoELayer(D, **KW, d_model_typo=1, rngs=nnx.Rngs(0))


def test_router_stream_feeds_training_randomness():
  x_BLD = jax.random.normal(jax.random.key(2), (B, L, D))
  model = moe_nnx.MoELayer(D, **KW, rngs=nnx.Rngs(params=0, router=1))
  first, _ = model(x_BLD, deterministic=False)
  second, _ = model(x_BLD, deterministic=False)  # The stream moved on.
  assert not np.allclose(first, second)
  again = moe_nnx.MoELayer(D, **KW, rngs=nnx.Rngs(params=0, router=1))
  np.testing.assert_array_equal(again(x_BLD, deterministic=False)[0], first)
  np.testing.assert_array_equal(model(x_BLD)[0], again(x_BLD)[0])  # Evaluation.
  # Linen: the same stream is rngs={"router": key}; training without it fails.
  linen = MoELayer(**KW)
  variables = {"params": _linen_params(model)}
  with pytest.raises(Exception, match="router"):
    linen.apply(variables, x_BLD, deterministic=False)
  y_a, _ = linen.apply(variables, x_BLD, deterministic=False,
                       rngs={"router": jax.random.key(5)})
  y_b, _ = linen.apply(variables, x_BLD, deterministic=False,
                       rngs={"router": jax.random.key(6)})
  assert not np.allclose(y_a, y_b)


def test_nnx_layer_on_a_mesh():
  mesh = make_mesh(MeshConfig(data=2, expert=4), num_experts=E)
  # One balance-loss group on both (the `aux` default is one per device).
  kw = {**KW, "router_options": {"micro_batches": 1}}
  sharded = moe_nnx.shard(
      moe_nnx.MoELayer(D, **kw, mesh=mesh, rngs=nnx.Rngs(0)), mesh)
  alone = moe_nnx.MoELayer(D, **kw, rngs=nnx.Rngs(0))
  w_in = nnx.state(sharded, nnx.Param)["moe"]["experts"]["w_in"]
  assert w_in[...].sharding.spec[0] == "expert"
  x_BLD = jax.random.normal(jax.random.key(3), (B, L, D))

  @nnx.jit
  def step(model, x_BLD):
    return nnx.value_and_grad(lambda m: _loss(*m(x_BLD)))(model)

  value, grads = step(sharded, x_BLD)
  want, want_grads = step(alone, x_BLD)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(grads)),
                  jax.tree.leaves(nnx.to_pure_dict(want_grads))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


class _ScanBlock(nn.Module):
  """A residual MoE block with the (carry, x) -> (carry, y) signature of nn.scan."""

  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BLD, _):
    moe = MoELayer("switch", num_experts=E, d_ff=F,
                   router_options={"jitter": 0.1})
    y_BLD, aux = moe(nn.RMSNorm()(x_BLD), deterministic=self.deterministic)
    return x_BLD + y_BLD, aux.aux_loss


def test_linen_scan_over_moe_blocks():
  """nn.scan stacks the blocks' params on a `layers` axis; the `router` stream
  is split per block like `params`."""
  def scanned(deterministic):
    return nn.scan(_ScanBlock, variable_axes={"params": 0},
                   split_rngs={"params": True, "router": True}, length=3,
                   metadata_params={nn.PARTITION_NAME: "layers"})(
                       deterministic=deterministic)

  x_BLD = jax.random.normal(jax.random.key(4), (B, L, D))
  boxed = jax.jit(scanned(True).init)(jax.random.key(0), x_BLD, None)
  spec = nn.get_partition_spec(boxed)["params"]["MoELayer_0"]["experts"]["w_in"]
  assert tuple(spec) == ("layers", "expert", "embed", "mlp")
  variables = nn.unbox(boxed)
  w_in = variables["params"]["MoELayer_0"]["experts"]["w_in"]
  assert w_in.shape == (3, E, D, F)
  # The scan is the three blocks applied in turn, each with its own params.
  y_BLD, aux_L = jax.jit(scanned(True).apply)(variables, x_BLD, None)
  assert aux_L.shape == (3,)
  block, h_BLD = jax.jit(_ScanBlock().apply), x_BLD
  for i in range(3):
    h_BLD, _ = block(jax.tree.map(lambda a, i=i: a[i], variables), h_BLD, None)
  np.testing.assert_allclose(y_BLD, h_BLD, rtol=1e-5, atol=1e-5)
  # Training: every block draws its own jitter from the split `router` stream.
  grads = jax.jit(jax.grad(lambda v: jnp.sum(scanned(False).apply(
      v, x_BLD, None, rngs={"router": jax.random.key(1)})[0] ** 2)))(variables)
  assert np.all(np.isfinite(jax.tree.leaves(grads)[0]))
