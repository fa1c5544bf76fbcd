"""Throughput of training steps: a clock that runs only while they do, model
FLOPs per token, and model FLOPs utilisation (MFU) where the chip's peak is known.

Shapes: L length (of a sequence), D model width, F hidden width, E experts, K
top-k experts per token, V vocabulary.
"""

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import jax

from moejax.models.config import TransformerConfig

# Dense bf16 peak FLOP/s of one JAX device, by `device_kind` (matched as a
# substring, longest first). TPU v2/v3 devices are cores, later ones chips.
PEAK_FLOPS: dict[str, float] = {
    "TPU v2": 22.5e12,
    "TPU v3": 61.5e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "H200": 989e12,
    "H100": 989e12,
    "H100 PCIe": 756e12,
    "A100": 312e12,
    "L4": 121e12,
    "V100": 125e12,
}


def peak_flops(device: jax.Device | None = None) -> float | None:
  """Dense bf16 peak FLOP/s of `device` (default: the first), None if unknown
  (CPUs, unlisted accelerators)."""
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    return None
  kind = device.device_kind
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if name in kind:
      return PEAK_FLOPS[name]
  return None


def train_flops_per_token(config: TransformerConfig, seq_len: int, *,
                          source_len: int | None = None) -> float:
  """Model FLOPs of one training token: 6 x the matmul params it uses (forward
  2, backward 4) plus 12 L D per block for attention scores and values.

  An MoE token uses its router and K experts of width F_e (K: `top_k`, the
  mean experts per token for expert choice); capacity padding and dropped
  tokens are not counted, so MFU measures useful work.

  `encdec`: the FLOPs of one source token (encoder blocks, and the decoder's
  cross-attention keys and values) plus one target token (decoder blocks:
  self-attention, the cross-attention query and output, over `source_len`
  keys, default `seq_len`): the FLOPs per target token when source and target
  are equally long.
  """
  d, moe = config.d_model, config.moe
  source_len = seq_len if source_len is None else source_len
  dense_ffn = 2 * d * config.d_ff
  moe_ffn = d * moe.num_experts + moe.top_k * 2 * d * (moe.d_ff or config.d_ff)
  matmul_params = config.vocab_size * d  # Output logits (the lookup is free).
  attention = 0
  for stack in config.block_stacks:
    cross = stack.name == "decoder"  # Cross-attention: q, k, v, out.
    length = source_len if stack.name == "encoder" else seq_len
    for i in range(stack.num_layers):
      matmul_params += (4 * d * d * (1 + cross)
                        + (moe_ffn if i in stack.moe_layers else dense_ffn))
      attention += 12 * d * (length + cross * source_len)
  return 6.0 * matmul_params + attention


class StepTimer:
  """Wall time of training steps only.

  The clock runs from the end of the first `paused()` block (a loop's first
  step compiles inside one) except inside later ones: evaluation, probes,
  checkpoints, logging, compilation. `count()` adds a step dispatched while the
  clock runs; `take()` returns (steps, seconds) since the last take.
  """

  def __init__(self):
    self._since: float | None = None
    self._seconds, self._steps = 0.0, 0

  def count(self) -> None:
    self._steps += 1

  @contextlib.contextmanager
  def paused(self, outputs: Any) -> Iterator[None]:
    """Waits for `outputs` (steps run asynchronously), so the clock stops when
    the device has finished them, and restarts it when the block ends."""
    jax.block_until_ready(outputs)
    if self._since is not None:
      self._seconds += time.perf_counter() - self._since
      self._since = None
    yield
    self._since = time.perf_counter()

  def take(self) -> tuple[int, float]:
    taken = self._steps, self._seconds
    self._steps, self._seconds = 0, 0.0
    return taken


def perf_metrics(steps: int, seconds: float, tokens_per_step: int,
                 flops_per_token: float, peak: float | None,
                 num_devices: int) -> dict[str, float]:
  """`perf/step_time` (s), `perf/tokens_per_sec` and, with a known peak,
  `perf/mfu`; empty when no step was timed."""
  if not steps or seconds <= 0:
    return {}
  tokens_per_sec = steps * tokens_per_step / seconds
  out = {"perf/step_time": seconds / steps, "perf/tokens_per_sec": tokens_per_sec}
  if peak:
    out["perf/mfu"] = flops_per_token * tokens_per_sec / (peak * num_devices)
  return out
