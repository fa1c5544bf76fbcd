"""Model FLOPs, chip peaks and the training-step clock."""

import time
import types

import jax.numpy as jnp
import pytest

from moejax.metrics.perf import (StepTimer, peak_flops, perf_metrics,
                                 train_flops_per_token)
from moejax.models import MoEConfig, TransformerConfig


def test_train_flops_per_token_by_hand():
  config = TransformerConfig(
      vocab_size=100, max_len=16, num_layers=2, d_model=8, num_heads=2, d_ff=32,
      moe_layers=(1,), moe=MoEConfig(num_experts=4, top_k=2, d_ff=16))
  # Block 0: attention 4*8*8 = 256, dense FFN 2*8*32 = 512.
  # Block 1: attention 256, router 8*4 = 32, two experts 2 * 2*8*16 = 512.
  # Logits 100*8 = 800. Params used: 256+512+256+32+512+800 = 2368.
  # Attention scores and values: 12 * 2 blocks * L=16 * D=8 = 3072.
  assert train_flops_per_token(config, 16) == 6 * 2368 + 3072


@pytest.mark.parametrize("platform,kind,peak", [
    ("cpu", "cpu", None),
    ("gpu", "NVIDIA H100 80GB HBM3", 989e12),
    ("gpu", "NVIDIA H100 PCIe", 756e12),
    ("gpu", "NVIDIA H200", 989e12),
    ("tpu", "TPU v5 lite", 197e12),
    ("tpu", "TPU v5p", 459e12),
    ("gpu", "NVIDIA GeForce GTX 1080", None),
])
def test_peak_flops_by_device_kind(platform, kind, peak):
  device = types.SimpleNamespace(platform=platform, device_kind=kind)
  assert peak_flops(device) == peak


def test_perf_metrics():
  out = perf_metrics(4, 2.0, 1000, 1e6, 1e9, 2)
  assert out == {"perf/step_time": 0.5, "perf/tokens_per_sec": 2000.0,
                 "perf/mfu": 1e6 * 2000 / 2e9}
  assert "perf/mfu" not in perf_metrics(4, 2.0, 1000, 1e6, None, 1)
  assert perf_metrics(0, 0.0, 1000, 1e6, 1e9, 1) == {}


def test_step_timer_counts_only_running_time():
  timer = StepTimer()
  time.sleep(0.2)  # Before the first pause (the compiled first step): not timed.
  with timer.paused(None):
    time.sleep(0.2)  # Compilation: not training.
  time.sleep(0.05)
  timer.count()
  with timer.paused(None):
    time.sleep(0.5)  # Evaluation, checkpoints: not training.
  time.sleep(0.05)
  timer.count()
  with timer.paused(None):
    steps, seconds = timer.take()  # As the log hook takes them.
    time.sleep(0.2)
  assert steps == 2 and 0.1 <= seconds < 0.4
  assert timer.take() == (0, 0.0)


def test_step_timer_pause_waits_for_the_device():
  timer = StepTimer()
  with timer.paused(None):
    pass
  x = jnp.ones((1024, 1024)) / 1024
  out = [x]
  for _ in range(8):  # Dispatched asynchronously; milliseconds to compute.
    out.append(out[-1] @ x)
  with timer.paused(out):
    assert all(o.is_ready() for o in out)
