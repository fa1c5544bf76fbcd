"""Progress display: a tqdm bar on a terminal, plain log lines otherwise."""

import sys


class Progress:
  """Shows step, loss and tokens/s at every logged step."""

  def __init__(self, total: int, initial: int, *, enabled: bool = True):
    self.enabled = enabled
    self._bar = None
    if enabled and sys.stdout.isatty():
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=initial, dynamic_ncols=True,
                       unit="step")
    self._last = initial

  def update(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    loss, tps = metrics.get("train/loss"), metrics.get("perf/tokens_per_sec")
    if self._bar is not None:
      self._bar.update(step - self._last)
      self._bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
    else:
      print(f"step {step:>6} | loss {loss:.4f} | {tps:,.0f} tok/s", flush=True)
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
