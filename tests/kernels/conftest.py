"""Kernel tests compare float32 results with a float64 loop at full precision."""

import jax
import pytest


@pytest.fixture(autouse=True)
def _full_precision_float32_dots():
  # On GPU, float32 dots default to TF32 (~1e-3 relative), in XLA and Triton
  # alike; "highest" makes both exact enough for 1e-5. A no-op on CPU.
  with jax.default_matmul_precision("highest"):
    yield
