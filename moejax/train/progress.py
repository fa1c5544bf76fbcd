"""Progress display: a tqdm bar on a terminal, plain log lines otherwise."""

import sys


class Progress:
  """A bar that advances every step, with loss and tokens/s at logged steps."""

  def __init__(self, total: int, initial: int, *, enabled: bool = True):
    self.enabled = enabled
    self._bar = None
    if enabled and sys.stdout.isatty():
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=initial, dynamic_ncols=True,
                       unit="step")
    self._last = initial

  def advance(self, step: int) -> None:
    """Moves the bar to `step` (a finished training step)."""
    if self._bar is not None and step > self._last:
      self._bar.update(step - self._last)
      self._last = step

  def update(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    self.advance(step)
    loss, tps = metrics.get("train/loss"), metrics.get("perf/tokens_per_sec")
    speed = f" | {tps:,.0f} tok/s" if tps is not None else ""
    if self._bar is not None:
      self._bar.set_postfix_str(f"loss {loss:.3f}{speed}")
    else:
      print(f"step {step:>6} | loss {loss:.4f}{speed}", flush=True)
    self._last = step

  def message(self, text: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
