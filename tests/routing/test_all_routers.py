"""Every registered router inside the MoE layer, on every dispatch path it supports."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe import MoELayer
from moejax.routing import ROUTERS

B, L, D, F, E, V = 2, 8, 8, 16, 4, 50


def _top_k(cls) -> int:
  """2 where the router allows it (exercises K > 1), else 1."""
  return 1 if cls.top1_only else 2


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_router_in_layer_forward_grad_and_aux_loss(name):
  key_x, key_ids, key_init, key_router = jax.random.split(jax.random.key(0), 4)
  x_BLD = jax.random.normal(key_x, (B, L, D))
  ids_BL = jax.random.randint(key_ids, (B, L), 0, V)
  step = {"step": jnp.int32(10)}  # Every router takes it; schedules read it.
  # Both dispatch paths hold the same variables: initialise once (on a path
  # the router supports: the layer rejects the others).
  kw = dict(num_experts=E, d_ff=F, top_k=_top_k(ROUTERS[name]), vocab_size=V)
  layer = MoELayer(name, **kw, dispatch=ROUTERS[name].dispatch_paths[0])
  init = jax.jit(functools.partial(layer.init, token_ids_BL=ids_BL))
  variables = nn.unbox(init({"params": key_init, "router": key_router}, x_BLD))
  params = variables.pop("params")
  model_state = dict(variables)

  for path in ROUTERS[name].dispatch_paths:
    layer = MoELayer(name, **kw, dispatch=path)

    def loss(p, layer=layer):
      (y_BLD, aux), state = layer.apply(
          {"params": p, **model_state}, x_BLD, token_ids_BL=ids_BL,
          deterministic=False, rngs={"router": key_router},
          capture_intermediates=True, mutable=["intermediates"], **step)
      (routing,) = state["intermediates"]["router"]["__call__"]
      return jnp.mean(y_BLD**2) + aux.aux_loss, (y_BLD, aux, routing)

    # One jitted program: cheaper than running the layer op by op.
    (_, (y_BLD, aux, routing)), grads = jax.jit(
        jax.value_and_grad(loss, has_aux=True))(params)
    assert np.all(np.isfinite(y_BLD)), path
    assert aux.aux_loss.shape == () and np.isfinite(aux.aux_loss), path
    # The layer hands on the router's weighted aux loss as is: the model adds
    # it to the task loss once, and reports the same number.
    assert float(aux.aux_loss) == float(routing.aux_loss), path
    assert float(aux.metrics["aux_loss"]) == float(routing.aux_loss), path
    assert all(np.shape(v) == () for v in aux.metrics.values()), path
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads)), path
    assert any(np.any(g != 0) for g in jax.tree.leaves(grads["experts"])), path
