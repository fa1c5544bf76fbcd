"""Every router and dispatch path in the encoder and encoder-decoder models;
the encoder-decoder expert-parallel on 8 devices equals one device."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.models import MoEConfig, TransformerConfig, make_model
from moejax.parallel import MeshConfig, logical_shardings, make_mesh
from moejax.routing import ROUTERS

V, MAX_LEN = 32, 8


def _config(arch, router="switch", dispatch="capacity", num_experts=4,
            top_k=1, num_layers=1, **moe):
  return TransformerConfig(
      vocab_size=V, max_len=MAX_LEN, num_layers=num_layers, d_model=16,
      num_heads=2, d_ff=32, arch=arch, moe_layers=(num_layers - 1,),
      encoder_moe_layers=(0,) if arch == "encdec" else (),
      moe=MoEConfig(num_experts=num_experts, top_k=top_k, router=router,
                    dispatch=dispatch, **moe))


def _inputs(arch, rows=2, seed=1):
  src = jax.random.randint(jax.random.key(seed), (rows, MAX_LEN), 0, V)
  tgt = jax.random.randint(jax.random.key(seed + 1), (rows, MAX_LEN), 0, V)
  segments = jnp.asarray([[1] * 5 + [2] * 2 + [0]] * rows, jnp.int32)
  if arch == "encoder":
    return (src,), dict(segments_BL=segments)
  return (src, tgt), dict(source_segments_BL=segments,
                          target_segments_BL=segments)


def _init(config, args, kwargs):
  model = make_model(config)
  return nn.unbox(jax.jit(functools.partial(model.init, **kwargs))(
      {"params": jax.random.key(0), "router": jax.random.key(1)}, *args))


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_router_trains_in_both_architectures(name):
  """Forward and gradient as training runs them (router rng, step, mutable
  router state), both dispatch paths: a finite loss, finite gradients that
  reach the experts of every MoE layer, the aux loss of both stacks."""
  cls = ROUTERS[name]
  top_k = 1 if cls.top1_only else 2
  runs = {}
  for arch in ("encoder", "encdec"):
    args, kwargs = _inputs(arch)
    first = _config(arch, name, cls.dispatch_paths[0], top_k=top_k)
    variables = _init(first, args, kwargs)
    for path in cls.dispatch_paths:
      model = make_model(_config(arch, name, path, top_k=top_k))
      runs[arch, path] = (model, variables, args, kwargs)

  def losses(params_by_run):
    out = {}
    for key, (model, variables, args, kwargs) in runs.items():
      def loss(params, model=model, variables=variables, args=args,
               kwargs=kwargs):
        state = {k: v for k, v in variables.items() if k != "params"}
        (logits, aux), _ = model.apply(
            {**state, "params": params}, *args, **kwargs, deterministic=False,
            step=jnp.int32(10), rngs={"router": jax.random.key(2)},
            mutable=["router_state"])
        task = -jnp.mean(jax.nn.log_softmax(logits)[..., 0])
        return task + aux["aux_loss"], aux
      out[key] = jax.value_and_grad(loss, has_aux=True)(params_by_run[key])
    return out

  params = {key: run[1]["params"] for key, run in runs.items()}
  for key, ((value, aux), grads) in jax.jit(losses)(params).items():
    assert np.isfinite(value), key
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads)), key
    names = ({"layer_0"} if key[0] == "encoder"
             else {"encoder_layer_0", "decoder_layer_0"})
    assert set(aux["layers"]) == names, key
    assert np.isfinite(aux["aux_loss"]), key
    stacks = ([grads] if key[0] == "encoder"
              else [grads["encoder"], grads["decoder"]])
    for stack in stacks:
      experts = stack["block_0"]["moe"]["experts"]
      assert any(np.any(g != 0) for g in jax.tree.leaves(experts)), key


@pytest.mark.parametrize("dispatch,mesh_shape", [("capacity", (1, 8)),
                                                 ("dropless", (2, 4))])
def test_encdec_expert_parallel_equals_one_device(dispatch, mesh_shape):
  """Logits, aux loss and gradients: only the order of sums differs. The
  capacity factor E keeps every slot; the balance loss is computed per
  device, so the one-device model computes it on the same 8 groups."""
  kw = dict(num_experts=8, num_layers=2, dispatch=dispatch, capacity_factor=8.0)
  config = _config("encdec", **kw)
  one = make_model(_config("encdec", **kw,
                           router_options=(("micro_batches", 8),)))
  mesh = make_mesh(MeshConfig(*mesh_shape), num_experts=8)
  on_mesh = make_model(config, mesh=mesh)
  args, kwargs = _inputs("encdec", rows=8)
  boxed = jax.eval_shape(functools.partial(make_model(config).init, **kwargs),
                         jax.random.key(0), *args)
  variables = _init(config, args, kwargs)
  placed = jax.device_put(variables, logical_shardings(
      nn.get_partition_spec(boxed), variables, mesh))

  def loss(params, model):
    logits, aux = model.apply({"params": params}, *args, **kwargs)
    return jnp.mean(logits ** 2) + aux["aux_loss"], (logits, aux["aux_loss"])

  def grad(params, model):
    return jax.jit(jax.value_and_grad(functools.partial(loss, model=model),
                                      has_aux=True))(params)
  (_, (logits_1, aux_1)), grads_1 = grad(variables["params"], one)
  (_, (logits_8, aux_8)), grads_8 = grad(placed["params"], on_mesh)
  if dispatch == "capacity":  # Tokens move between devices by all-to-all.
    lowered = jax.jit(functools.partial(loss, model=on_mesh)).lower(
        placed["params"])
    assert "all_to_all" in lowered.as_text()
  np.testing.assert_allclose(logits_8, logits_1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux_8, aux_1, rtol=1e-5)
  for g8, g1 in zip(jax.tree.leaves(grads_8), jax.tree.leaves(grads_1),
                    strict=True):
    np.testing.assert_allclose(g8, g1, rtol=1e-4, atol=1e-5)
  # The experts of both stacks are split over the expert axis.
  for stack in ("encoder", "decoder"):
    w_in = placed["params"][stack]["block_1" if stack == "decoder"
                                   else "block_0"]["moe"]["experts"]["w_in"]
    assert w_in.sharding.spec[0] == "expert"
