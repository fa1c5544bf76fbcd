"""One FFN initializer (`model.ffn_init`) for the dense FFN and every expert."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.errors import ConfigError
from moejax.models import TransformerLM
from moejax.models.config import MoEConfig, TransformerConfig
from moejax.models.transformer import DenseFFN
from moejax.moe import MoELayer
from moejax.moe.ffn_init import FFN_INITS, FFNInit

D, F, LAYERS = 64, 256, 4


def expected_std(name: str, kernel: str) -> float:
  """The std each scheme promises (module docstring of moejax.moe.ffn_init)."""
  if name == "normal":
    return 0.02
  fan_in = D if kernel == "w_in" else F
  depth = 2 * LAYERS if (name, kernel) == ("fan_in_depth", "w_out") else 1
  return 1 / math.sqrt(fan_in * depth)


@pytest.mark.parametrize("name", FFN_INITS)
def test_one_expert_stack_is_the_dense_kernel_drawn_with_the_same_key(name):
  init = FFNInit(name, LAYERS)
  key = jax.random.key(7)
  np.testing.assert_array_equal(init.w_in(key, (1, D, F))[0], init.w_in(key, (D, F)))
  np.testing.assert_array_equal(init.w_out(key, (1, F, D))[0],
                                init.w_out(key, (F, D)))


@pytest.mark.parametrize("name", FFN_INITS)
def test_dense_ffn_and_experts_of_one_model_draw_from_one_distribution(name):
  cfg = TransformerConfig(vocab_size=64, max_len=8, num_layers=LAYERS, d_model=D,
                          num_heads=2, d_ff=F, moe_layers=(1, 3),
                          moe=MoEConfig(num_experts=8), ffn_init=name)
  params = nn.unbox(TransformerLM(cfg).init(jax.random.key(0),
                                            jnp.zeros((1, 8), jnp.int32)))["params"]
  for kernel in ("w_in", "w_out"):
    dense = np.asarray(params["block_0"]["ffn"][kernel]["kernel"])
    experts = np.asarray(params["block_1"]["moe"]["experts"][kernel])
    want = expected_std(name, kernel)
    # 16K dense and 131K expert draws: the sample std is within 2% of the truth.
    assert dense.std() == pytest.approx(want, rel=0.02), (kernel, dense.std())
    assert experts.std() == pytest.approx(want, rel=0.02), (kernel, experts.std())
    for e in range(experts.shape[0]):  # Every expert, not only the stack.
      assert experts[e].std() == pytest.approx(want, rel=0.05), (kernel, e)
    if name != "normal":  # Truncated at two (pre-rescale) standard deviations.
      bound = 2 * want / 0.8796256610342398
      assert np.abs(dense).max() <= bound and np.abs(experts).max() <= bound
    assert abs(dense.mean()) < 0.05 * want and abs(experts.mean()) < 0.05 * want


def test_one_expert_moe_with_gate_one_computes_the_dense_ffn():
  """A 1-expert MoE (softmax over one expert: gate 1) holding the dense FFN's
  kernels, which the same key draws for both, is the dense FFN."""
  init = FFNInit("fan_in_depth", LAYERS)
  k_in, k_out = jax.random.split(jax.random.key(3))
  w_in_DF, w_out_FD = init.w_in(k_in, (D, F)), init.w_out(k_out, (F, D))
  x_BLD = jax.random.normal(jax.random.key(4), (2, 8, D))
  dense = DenseFFN(F, ffn_init=init)
  y_dense = dense.apply({"params": {"w_in": {"kernel": w_in_DF},
                                    "w_out": {"kernel": w_out_FD}}}, x_BLD)
  moe = MoELayer("topk", num_experts=1, d_ff=F, dispatch="dropless",
                 ffn_init=init)
  variables = nn.unbox(moe.init(jax.random.key(5), x_BLD))
  experts = {"w_in": init.w_in(k_in, (1, D, F)), "w_out": init.w_out(k_out, (1, F, D))}
  variables["params"]["experts"] = experts
  y_moe, _ = moe.apply(variables, x_BLD)
  np.testing.assert_allclose(y_moe, y_dense, rtol=1e-5, atol=1e-6)


def test_unknown_scheme_is_a_config_error():
  with pytest.raises(ConfigError, match="model.ffn_init='xavier'.*fan_in"):
    FFNInit("xavier")
