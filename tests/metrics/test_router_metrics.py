"""Router health metrics by hand."""

import jax.numpy as jnp
import numpy as np

from moejax.metrics.router import load_metrics


def test_load_percentile_and_dead_experts():
  # Loads [0.5, 0.25, 0.25, 0], mean 0.25. Sorted [0, .25, .25, .5]: the 99th
  # percentile sits at position 0.99 * 3 = 2.97, 0.25 + 0.97 * 0.25 = 0.4925,
  # / 0.25 = 1.97. One expert got nothing. Max / mean = 2.
  load_E = jnp.array([0.5, 0.25, 0.25, 0.0])
  mask_TK = jnp.ones((4, 1), bool)
  m = load_metrics(load_E, mask_TK, mask_TK)
  np.testing.assert_allclose(m["load_p99_over_mean"], 1.97, rtol=1e-6)
  np.testing.assert_allclose(m["load_max_over_mean"], 2.0, rtol=1e-6)
  assert float(m["dead_experts"]) == 1.0
  balanced = load_metrics(jnp.full((4,), 0.25), mask_TK, mask_TK)
  np.testing.assert_allclose(balanced["load_p99_over_mean"], 1.0, rtol=1e-6)
  assert float(balanced["dead_experts"]) == 0.0
