"""Simulate 8 CPU devices before jax is imported anywhere in the test session."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data():
  """The shared text corpora beside the checkout; skips where they are absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"shared corpora not found at {SHARED_DATA}")
  return SHARED_DATA
