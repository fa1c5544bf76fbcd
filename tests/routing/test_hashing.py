"""Hash layers: routing by token id only, table balance on a Zipf stream, table
swap, and the init transform that sets the corpus-balanced table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.errors import ConfigError
from moejax.moe import MoELayer
from moejax.routing import (HashRouter, frequency_balanced_table,
                            frequency_tables, make_router, set_hash_tables,
                            table_from_tokens)
from moejax.routing.hashing import random_balanced_table

V, E, D = 500, 4, 8


def _zipf_stream(seed: int, size: int = 20_000) -> np.ndarray:
  """Token ids with P(rank r) proportional to 1/r over V ids (the top id ~15%)."""
  p_V = 1.0 / np.arange(1, V + 1)
  return np.random.default_rng(seed).choice(V, size=size, p=p_V / p_V.sum())


def _init(router, num_tokens=6):
  x_TD = jnp.zeros((num_tokens, D))
  ids_T = jnp.arange(num_tokens)
  return router.init(jax.random.key(0), x_TD, token_ids_T=ids_T)


def test_routing_depends_only_on_token_ids():
  router = make_router("hash", num_experts=E, vocab_size=V)
  variables = _init(router)
  assert "params" not in variables or not variables["params"]
  table_V = np.asarray(variables["constants"]["hash_table"])
  assert table_V.shape == (V,) and table_V.dtype == np.int32
  ids_T = jnp.array([3, 17, 3, 499, 0, 42])
  x1_TD = jax.random.normal(jax.random.key(1), (6, D))
  x2_TD = jax.random.normal(jax.random.key(2), (6, D))
  r1 = router.apply(variables, x1_TD, token_ids_T=ids_T, deterministic=False)
  r2 = router.apply(variables, x2_TD, token_ids_T=ids_T)
  for a, b in zip(jax.tree.leaves(r1), jax.tree.leaves(r2)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(r1.expert_TK[:, 0], table_V[np.asarray(ids_T)])
  np.testing.assert_array_equal(r1.weight_TK, 1.0)
  assert float(r1.aux_loss) == 0.0


def test_random_table_is_balanced_over_ids_and_differs_by_seed():
  a_V = np.asarray(random_balanced_table(jax.random.key(0), V, E))
  b_V = np.asarray(random_balanced_table(jax.random.key(1), V, E))
  np.testing.assert_array_equal(np.bincount(a_V, minlength=E), [V // E] * E)
  assert np.any(a_V != b_V)


def test_loads_on_a_zipf_stream_are_within_stated_tolerances():
  ids = _zipf_stream(0)
  counts_V = np.bincount(ids, minlength=V)
  num_tokens = ids.size
  # Frequency table, on the counted stream: max - min <= max count (guarantee).
  load_E = np.bincount(frequency_balanced_table(counts_V, E)[ids], minlength=E)
  assert load_E.max() - load_E.min() <= counts_V.max()
  # On a fresh stream from the same distribution it stays within 5% of the mean
  # (about 1% observed).
  held_out = np.bincount(table_from_tokens(ids, V, E)[_zipf_stream(1)],
                         minlength=E)
  assert held_out.max() <= 1.05 * num_tokens / E
  # Random table: every load within N/E +- 4 sigma,
  # sigma = sqrt((1/E)(1 - 1/E) sum_v c_v^2) (about 0.32 N/E here).
  sigma = np.sqrt((1 / E) * (1 - 1 / E) * np.sum(counts_V.astype(float) ** 2))
  for seed in range(5):
    table_V = np.asarray(random_balanced_table(jax.random.key(seed), V, E))
    load_E = np.bincount(table_V[ids], minlength=E)
    assert np.all(np.abs(load_E - num_tokens / E) <= 4 * sigma)


def test_frequency_table_spreads_unseen_ids():
  counts_V = np.zeros(12, int)
  counts_V[:3] = [10, 6, 5]
  table_V = frequency_balanced_table(counts_V, 3)
  # 10 -> e0, 6 -> e1, 5 -> e2; the 9 unseen ids go 3 to each expert.
  np.testing.assert_array_equal(table_V[:3], [0, 1, 2])
  np.testing.assert_array_equal(np.bincount(table_V, minlength=3), [4, 4, 4])


def test_set_hash_tables_replaces_every_table_and_nothing_else():
  layer = MoELayer("hash", num_experts=E, d_ff=16, dispatch="dropless",
                   vocab_size=V, router_options={"balance": "frequency"})
  x_BLD = jax.random.normal(jax.random.key(3), (2, 4, D))
  ids_BL = jnp.array([[1, 2, 3, 4], [5, 6, 7, 8]])
  variables = dict(jax.jit(layer.init)(jax.random.key(4), x_BLD,
                                       token_ids_BL=ids_BL))
  params = variables.pop("params")
  # Two MoE layers' worth of model state, as a TransformerLM would hold it.
  model_state = {"constants": {"block_1": {"moe": variables["constants"]},
                               "block_3": {"moe": variables["constants"]}}}
  new_table_V = np.arange(V, dtype=np.int32) % E
  new_state = set_hash_tables(model_state, new_table_V)
  for block in ("block_1", "block_3"):
    np.testing.assert_array_equal(
        new_state["constants"][block]["moe"]["router"]["hash_table"],
        new_table_V)
  # The input is untouched (a pure transform).
  old_table_V = model_state["constants"]["block_1"]["moe"]["router"]["hash_table"]
  assert np.any(np.asarray(old_table_V) != new_table_V)
  constants = new_state["constants"]["block_1"]["moe"]
  _, aux = jax.jit(layer.apply)({"params": params, "constants": constants},
                                x_BLD, token_ids_BL=ids_BL)
  # ids 1..8 under arange % 4 load every expert twice.
  assert float(aux.metrics["load_max_over_mean"]) == pytest.approx(1.0)
  # Each table its own buffer: a donated train state may not alias buffers.
  donated = jax.jit(lambda tree: tree, donate_argnums=0)(new_state)
  assert len(jax.tree.leaves(donated)) == 2
  with pytest.raises(ConfigError, match="hash table has shape"):
    set_hash_tables(model_state, new_table_V[:10])
  with pytest.raises(ConfigError, match="no 'constants/.../hash_table'"):
    set_hash_tables({"constants": {}}, new_table_V)


def test_init_transform_sets_every_table_balanced_on_the_counts():
  """`balance="frequency"` declares `frequency_tables` as its init transform:
  every table of the state becomes the counts' balanced table; `random` has
  none (its drawn table is kept)."""
  router = make_router("hash", num_experts=E, vocab_size=V,
                       options={"balance": "frequency"})
  table = _init(router)["constants"]
  model_state = {"constants": {"block_1": {"moe": {"router": table}},
                               "block_3": {"moe": {"router": table}}}}
  counts_V = np.bincount(_zipf_stream(4), minlength=V)
  transform = HashRouter.init_transform({"balance": "frequency"},
                                        num_experts=E)
  new_state = transform(model_state, counts_V)
  want_V = frequency_balanced_table(counts_V, E)
  for block in ("block_1", "block_3"):
    np.testing.assert_array_equal(
        new_state["constants"][block]["moe"]["router"]["hash_table"], want_V)
  assert np.any(np.asarray(table["hash_table"]) != want_V)
  np.testing.assert_array_equal(
      frequency_tables(model_state, counts_V, num_experts=E)["constants"][
          "block_1"]["moe"]["router"]["hash_table"], want_V)
  assert HashRouter.init_transform({"balance": "random"}, num_experts=E) is None


def test_clear_errors():
  with pytest.raises(ConfigError, match="router 'hash' needs token ids"):
    make_router("hash", num_experts=E)
  router = make_router("hash", num_experts=E, vocab_size=V)
  variables = _init(router)
  with pytest.raises(ConfigError, match="router 'hash' needs token ids"):
    router.apply(variables, jnp.zeros((6, D)))
  with pytest.raises(ConfigError, match="apply with the 'constants' collection"):
    router.apply({"params": {}}, jnp.zeros((6, D)), token_ids_T=jnp.arange(6))
  with pytest.raises(ConfigError, match="router 'hash' sends each token to one"):
    make_router("hash", num_experts=E, top_k=2, vocab_size=V)
  with pytest.raises(ConfigError, match="balance='zipf'; valid: random, frequency"):
    make_router("hash", num_experts=E, vocab_size=V,
                options={"balance": "zipf"})
