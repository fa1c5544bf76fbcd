"""One initializer for every FFN: the dense FFN's kernels and each expert's.

Shapes: E experts, D model width, F hidden width. A kernel is
[..., fan_in, fan_out]: w_in [D, F] and w_out [F, D] for a dense FFN, [E, D, F]
and [E, F, D] for stacked experts. The scale depends only on the last two axes,
and the draw is one call over the whole shape, so every expert of a stack is
drawn from the dense kernel's distribution, and a stack of one expert drawn with
key k equals the dense kernel drawn with k (a one-expert MoE whose gate is 1
starts as the dense FFN would).

Named schemes (`model.ffn_init`):
- `normal`: N(0, 0.02^2) for w_in and w_out (GPT-2's base scale);
- `fan_in`: truncated normal with variance 1/fan_in for both (LeCun normal);
- `fan_in_depth`: w_in as `fan_in`; w_out with variance 1/(fan_in * 2 *
  num_layers), so that the 2 * num_layers residual branches together start at
  the scale of one (the depth scaling of GPT-2's output projections).
"""

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from moejax.errors import ConfigError

Initializer = Callable[..., jax.Array]  # (key, shape, dtype) -> array.

FFN_INITS = ("normal", "fan_in", "fan_in_depth")
DEFAULT_FFN_INIT = "fan_in"
# Std of a standard normal truncated to [-2, 2]: dividing by it restores std 1.
_TRUNCATED_STD = 0.87962566103423978


def _truncated_normal(scale: float) -> Initializer:
  """Truncated normal with std `scale / sqrt(fan_in)`, fan_in = shape[-2]."""
  def init(key, shape, dtype=jnp.float32):
    std = scale / math.sqrt(shape[-2])
    draw = jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
    return (draw * (std / _TRUNCATED_STD)).astype(dtype)
  return init


def _normal(std: float) -> Initializer:
  def init(key, shape, dtype=jnp.float32):
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)
  return init


@dataclasses.dataclass(frozen=True)
class FFNInit:
  """The initializers of an FFN's two kernels (dense [D, F] or stacked [E, D, F]).

  Attributes:
    name: the scheme, one of FFN_INITS.
    num_layers: blocks of the model (the depth that `fan_in_depth` scales by).
  """

  name: str = DEFAULT_FFN_INIT
  num_layers: int = 1

  def __post_init__(self):
    if self.name not in FFN_INITS:
      raise ConfigError(f"model.ffn_init={self.name!r} is not valid; choose one "
                        f"of {', '.join(FFN_INITS)}")

  @property
  def w_in(self) -> Initializer:
    """Initializer of w_in ([D, F] or [E, D, F])."""
    return _normal(0.02) if self.name == "normal" else _truncated_normal(1.0)

  @property
  def w_out(self) -> Initializer:
    """Initializer of w_out ([F, D] or [E, F, D])."""
    if self.name == "normal":
      return _normal(0.02)
    depth = 2 * self.num_layers if self.name == "fan_in_depth" else 1
    return _truncated_normal(1.0 / math.sqrt(depth))
