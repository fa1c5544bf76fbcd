"""A naive per-token loop: the reference every dispatch path is checked against.

Shapes: T tokens, D model width, F hidden width, E experts, K top-k slots per
token, Z shared experts.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def capacity_keep_loop(expert_TK, mask_TK, num_experts: int,
                       capacity: int | None) -> np.ndarray:
  """bool[T, K]: which slots an expert with C places accepts, slot k before k+1."""
  expert_TK, mask_TK = np.asarray(expert_TK), np.asarray(mask_TK)
  num_tokens, top_k = expert_TK.shape
  kept = np.zeros((num_tokens, top_k), bool)
  filled = [0] * num_experts
  for k in range(top_k):
    for t in range(num_tokens):
      e = int(expert_TK[t, k])
      if mask_TK[t, k] and (capacity is None or filled[e] < capacity):
        kept[t, k] = True
        filled[e] += 1
  return kept


def deep_expert_loop(z_D, w_in, w_out, activation=nn.gelu):
  """One deep expert on one row of the residual stream: w_in [n, D, F], w_out
  [n, F, D]; z <- z + FFN_j(z / rms(z)) for j = 1..n; returns z_n - z_0."""
  z0_D = z_D
  for j in range(w_in.shape[0]):
    normed_D = z_D * jax.lax.rsqrt(jnp.mean(z_D ** 2) + 1e-6)
    z_D = z_D + activation(normed_D @ w_in[j]) @ w_out[j]
  return z_D - z0_D


def moe_loop(x_TD, expert_TK, weight_TK, kept_TK, w_in_EDF, w_out_EFD,
             activation=nn.gelu, shared=None, residual_TD=None):
  """y_t = sum over kept slots k of weight[t, k] * FFN_{expert[t, k]}(x_t), plus
  sum over shared experts s of FFN_s(x_t) when `shared` = (w_in [Z, D, F],
  w_out [Z, F, D]). Deep experts (w_in [E, n, D, F]) run `deep_expert_loop` on
  the residual stream row `residual_TD[t]` instead of x_t."""
  rows = []
  for t in range(x_TD.shape[0]):
    y_D = jnp.zeros(x_TD.shape[1], x_TD.dtype)
    for s in range(0 if shared is None else shared[0].shape[0]):
      y_D = y_D + activation(x_TD[t] @ shared[0][s]) @ shared[1][s]
    for k in range(expert_TK.shape[1]):
      if kept_TK[t, k]:
        e = int(expert_TK[t, k])
        if w_in_EDF.ndim == 4:
          out_D = deep_expert_loop(residual_TD[t], w_in_EDF[e], w_out_EFD[e],
                                   activation)
        else:
          out_D = activation(x_TD[t] @ w_in_EDF[e]) @ w_out_EFD[e]
        y_D = y_D + weight_TK[t, k] * out_D
    rows.append(y_D)
  return jnp.stack(rows)
