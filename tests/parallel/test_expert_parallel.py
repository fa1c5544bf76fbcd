"""The expert-parallel layer against the single-device layer and per-device oracles.

8 simulated CPU devices (tests/conftest.py). Tolerances, float32: outputs
rtol 1e-5 / atol 1e-6; gradients rtol 1e-4 / atol 1e-5 (only the order of sums
differs: the data-axis psum of expert-weight gradients, the combine einsum).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.errors import ConfigError
from moejax.kernels import grouped_matmul
from moejax.moe import MoELayer
from moejax.moe.reference import capacity_keep_loop, moe_loop
from moejax.parallel import (MeshConfig, dense_ragged_all_to_all,
                             expert_parallel_ffn, local_capacity, make_mesh)
from moejax.routing import make_router

B, L, D, F, E = 16, 4, 8, 16, 8  # T = 64 tokens: 8 per device.
ROUTERS = {1: "switch", 2: "topk"}


def _layers(top_k, path, mesh, capacity_factor, router=None, ref_options=None):
  """(single-device layer, expert-parallel layer); `ref_options` go to the
  single-device layer's router only."""
  name = router or ROUTERS[top_k]
  kw = dict(num_experts=E, d_ff=F, top_k=top_k, dispatch=path,
            capacity_factor=capacity_factor)
  return (MoELayer(name, router_options=ref_options, **kw),
          MoELayer(name, mesh=mesh, **kw))


def _inputs(seed=1):
  return jax.random.normal(jax.random.key(seed), (B, L, D))


@pytest.fixture(scope="module")
def params():
  """One set of variables for every test: all routers used here have the same
  params (a [D, E] gate) besides the [E, D, F] and [E, F, D] experts."""
  layer = MoELayer("topk", num_experts=E, d_ff=F, top_k=2)
  return nn.unbox(jax.jit(layer.init)(jax.random.key(0), _inputs()))


def _compiled_loss_and_grads(layer, params, x_BLD):
  """Compiled (params, x) -> ((sum(y^2) + aux_loss, (y, metrics)), grads)."""
  def loss(p, x):
    y_BLD, aux = layer.apply(p, x)
    return jnp.sum(y_BLD ** 2) + aux.aux_loss, (y_BLD, aux.metrics)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)).lower(
      params, x_BLD).compile()


def _assert_trees_close(a, b, rtol, atol):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(u, v, rtol=rtol, atol=atol)


# Every pair of (dispatch, top-k, mesh) values appears once: 4 runs, not 8.
@pytest.mark.parametrize("path,top_k,mesh_shape", [
    ("capacity", 1, (1, 8)), ("capacity", 2, (2, 4)),
    ("dropless", 1, (2, 4)), ("dropless", 2, (1, 8))])
def test_matches_single_device_layer(params, path, top_k, mesh_shape):
  """Forward, metrics and gradients equal; the compiled program has all-to-all."""
  # cf = E / K gives C = S per device: no slot can be dropped on any device.
  mesh = make_mesh(MeshConfig(*mesh_shape), num_experts=E)
  # The aux balance loss is per micro-batch, one per device splitting the batch
  # (8 here): the single-device layer computes it on the same 8 groups.
  ref, ep = _layers(top_k, path, mesh, capacity_factor=E / top_k,
                    ref_options={"micro_batches": 8})
  x_BLD = _inputs()
  ep_step = _compiled_loss_and_grads(ep, params, x_BLD)
  # On the dropless path the all-to-all is the CPU fallback's dense exchange.
  assert "all-to-all" in ep_step.as_text()
  (l_ep, (y_ep, m_ep)), g_ep = ep_step(params, x_BLD)
  (l_ref, (y_ref, m_ref)), g_ref = _compiled_loss_and_grads(
      ref, params, x_BLD)(params, x_BLD)
  np.testing.assert_allclose(y_ep, y_ref, rtol=1e-5, atol=1e-6)
  assert float(m_ep["drop_frac"]) == 0.0
  _assert_trees_close(m_ep, m_ref, 1e-5, 1e-6)
  np.testing.assert_allclose(l_ep, l_ref, rtol=1e-5)
  _assert_trees_close(g_ep, g_ref, 1e-4, 1e-5)


def test_router_fixed_capacity_is_kept_whole(params):
  # Expert choice fixes C for all T tokens; each device keeps min(C, S) rows per
  # expert, so nothing the router chose is dropped.
  mesh = make_mesh(MeshConfig(2, 4), num_experts=E)
  ref, ep = _layers(2, "capacity", mesh, 1.0, router="expert_choice")
  x_BLD = _inputs(2)
  np.testing.assert_allclose(jax.jit(ep.apply)(params, x_BLD)[0],
                             jax.jit(ref.apply)(params, x_BLD)[0],
                             rtol=1e-5, atol=1e-6)
  assert local_capacity(8, E, E, 1.0, router_capacity=16) == 8


@pytest.mark.parametrize("top_k,mesh_shape", [(1, (1, 8)), (2, (2, 4))])
def test_drops_are_per_device(params, top_k, mesh_shape):
  """With C = ceil(1.0 * 8 * K / 8) = K per device, each device drops its own
  overflow: the oracle is the naive loop run shard by shard."""
  mesh = make_mesh(MeshConfig(*mesh_shape), num_experts=E)
  ref, ep = _layers(top_k, "capacity", mesh, capacity_factor=1.0)
  x_BLD = _inputs(3)
  shards = 8
  x_SBLD = x_BLD.reshape(shards, -1, L, D)  # Shard s holds batch rows 2s, 2s+1.

  def ep_fn(p):
    y_BLD, aux = ep.apply(p, x_BLD)
    return jnp.sum(y_BLD ** 2), (y_BLD, aux.metrics["drop_frac"])

  def per_shard_fn(p):
    # The single-device layer on each shard alone has the same capacity.
    y_SBLD = jax.vmap(lambda x: ref.apply(p, x)[0])(x_SBLD)
    return jnp.sum(y_SBLD ** 2)

  (_, (y_ep, drop_frac)), g_ep = jax.jit(jax.value_and_grad(ep_fn, has_aux=True))(
      params)
  assert float(drop_frac) > 0.0
  _assert_trees_close(g_ep, jax.jit(jax.grad(per_shard_fn))(params), 1e-4, 1e-5)

  x_TD = x_BLD.reshape(-1, D)
  router = make_router(ROUTERS[top_k], num_experts=E, top_k=top_k)
  routing = router.apply({"params": params["params"]["router"]}, x_TD)
  tokens = x_TD.shape[0] // shards
  capacity = local_capacity(tokens, E, top_k, 1.0)
  experts = params["params"]["experts"]
  rows = []
  for s in range(shards):
    t = slice(s * tokens, (s + 1) * tokens)
    kept_TK = capacity_keep_loop(routing.expert_TK[t], routing.mask_TK[t], E,
                                 capacity)
    rows.append(moe_loop(x_TD[t], routing.expert_TK[t], routing.weight_TK[t],
                         kept_TK, experts["w_in"], experts["w_out"]))
  np.testing.assert_allclose(y_ep.reshape(-1, D), jnp.concatenate(rows),
                             rtol=1e-5, atol=1e-6)


def test_ragged_exchange_traces_and_differentiates():
  # XLA:CPU cannot compile ragged-all-to-all; lowering (forward + transpose)
  # still checks shapes, dtypes and the offsets' plumbing.
  mesh = make_mesh(MeshConfig(2, 4), num_experts=E)
  router = make_router("topk", num_experts=E, top_k=2)
  x_TD = _inputs().reshape(-1, D)
  rparams = jax.jit(router.init)(jax.random.key(0), x_TD)
  w_in = jnp.ones((E, D, F)) / D
  w_out = jnp.ones((E, F, D)) / F

  def loss(x, w_in, w_out):
    y_TD, _ = expert_parallel_ffn(x, router.apply(rparams, x), w_in, w_out,
                                  mesh=mesh, dispatch_path="dropless",
                                  exchange="ragged")
    return jnp.sum(y_TD ** 2)

  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
      x_TD, w_in, w_out).as_text()
  assert text.count("ragged_all_to_all") == 4  # Two forward, two transposed.


def _ragged_reference(operands, outputs, in_off, send, out_off, recv):
  """The pseudocode of `jax.lax.ragged_all_to_all`'s docstring, in numpy."""
  n = len(operands)
  per = len(in_off[0]) // n
  results = [o.copy() for o in outputs]
  for src in range(n):
    for i in range(len(in_off[src])):
      dst, slot = divmod(i, per)
      rows = operands[src][in_off[src][i]:in_off[src][i] + send[src][i]]
      assert recv[dst][src * per + slot] == send[src][i]
      results[dst][out_off[src][i]:out_off[src][i] + len(rows)] = rows
  return results


def test_dense_exchange_equals_documented_ragged_all_to_all():
  n, per, rows, d = 4, 2, 20, 3
  rng = np.random.default_rng(0)
  send = rng.integers(0, 3, size=(n, n * per))  # [src, dst * per + slot]
  recv = send.reshape(n, n, per).transpose(1, 0, 2).reshape(n, n * per)
  in_off = np.cumsum(send, axis=1) - send  # Back to back on the sender.
  out_off = np.zeros_like(send)
  for dst in range(n):  # Receiver places (slot, src) slot-major, gaps of 1.
    at = 1
    for slot in range(per):
      for src in range(n):
        out_off[src, dst * per + slot] = at
        at += send[src, dst * per + slot] + 1
  operands = rng.normal(size=(n, rows, d)).astype(np.float32)
  outputs = np.full((n, 40, d), -1.0, np.float32)
  expected = _ragged_reference(operands, outputs, in_off, send, out_off, recv)
  mesh = jax.make_mesh((n,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])
  spec = jax.sharding.PartitionSpec("x")

  def body(op, out, a, b, c, e):
    return dense_ragged_all_to_all(op[0], out[0], a[0], b[0], c[0], e[0],
                                   axis_name="x", chunk_rows=5)[None]

  got = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 6,
                              out_specs=spec))(
      operands, outputs, *(jnp.asarray(v, jnp.int32)
                           for v in (in_off, send, out_off, recv)))
  np.testing.assert_array_equal(np.asarray(got), np.stack(expected))


def test_init_takes_any_token_count_apply_checks_it(params):
  mesh = make_mesh(MeshConfig(2, 4), num_experts=E)
  _, ep = _layers(2, "capacity", mesh, 1.25)
  x_BLD = jnp.zeros((1, 5, D))  # 5 tokens cannot split over 8 devices.
  shapes = jax.eval_shape(ep.init, jax.random.key(0), x_BLD)
  assert jax.tree.map(jnp.shape, nn.unbox(shapes)) == jax.tree.map(
      jnp.shape, params)
  with pytest.raises(ConfigError, match=r"5 tokens .* do not split over 8"):
    jax.eval_shape(ep.apply, params, x_BLD)


def test_dropless_runs_the_pallas_grouped_matmul(params):
  # The kernels of moejax.kernels run inside shard_map (interpreted on CPU).
  mesh = make_mesh(MeshConfig(2, 4), num_experts=E)
  x_TD = _inputs().reshape(-1, D)
  router = make_router("topk", num_experts=E, top_k=2)
  experts = params["params"]["experts"]

  def y(impl):
    routing = router.apply({"params": params["params"]["router"]}, x_TD)
    return expert_parallel_ffn(
        x_TD, routing, experts["w_in"], experts["w_out"], mesh=mesh,
        dispatch_path="dropless",
        ragged_dot=functools.partial(grouped_matmul, impl=impl))[0]

  np.testing.assert_allclose(jax.jit(lambda: y("pallas"))(),
                             jax.jit(lambda: y("xla"))(), rtol=1e-5, atol=1e-5)
