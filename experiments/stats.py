"""Seeds: the mean and spread of a measure, and when an ordering counts.

The ordering rule (one for the whole report): with N >= 2 seeds per method and
sample standard deviations s_a, s_b (ddof 1), "a < b" is

- **reproduced** when mean(b) - mean(a) > s_a + s_b,
- **contradicted** when mean(a) - mean(b) > s_a + s_b,
- **within the spread** otherwise;

with one seed the spread is unknown and no ordering is resolved. The rule is a
screen, not a significance test: with 3 seeds per method a gap of exactly
s_a + s_b is a two-sided Welch t-test p of 0.07 when the two spreads are equal,
0.10 when one is half the other, and about 0.2 when one is near zero.
"""

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np

RULE = ("An ordering a < b is *reproduced* (yes) when mean(b) - mean(a) exceeds "
        "s_a + s_b, the sum of the sample standard deviations over seeds, "
        "*contradicted* (**no**) when mean(a) - mean(b) does, and *within "
        "spread* otherwise; with one seed nothing is resolved. A threshold "
        "claim (x < t) is reproduced when mean + std < t.")
REPRODUCED = "yes"
CONTRADICTED = "**no**"
WITHIN_SPREAD = "within spread"
ONE_SEED = "1 seed: unresolved"


@dataclasses.dataclass(frozen=True)
class Spread:
  """One measure of one method over its seeds (finite values only)."""

  values: tuple[float, ...]

  @property
  def n(self) -> int:
    return len(self.values)

  @property
  def mean(self) -> float:
    return float(np.mean(self.values))

  @property
  def std(self) -> float:
    """Sample standard deviation (ddof 1); 0 for one seed."""
    return float(np.std(self.values, ddof=1)) if self.n > 1 else 0.0

  def format(self, spec: str = ".2f") -> str:
    """`mean ± std`, or the single value for one seed."""
    if self.n == 1:
      return format(self.mean, spec)
    return f"{self.mean:{spec}} ± {self.std:{spec}}"


def spread(values: Iterable[float | None]) -> Spread | None:
  """The finite values as a Spread; None when there is none."""
  kept = tuple(float(v) for v in values
               if v is not None and math.isfinite(float(v)))
  return Spread(kept) if kept else None


def fmt(s: Spread | None, spec: str = ".2f") -> str:
  """A table cell: `-` when the measure is missing."""
  return "-" if s is None else s.format(spec)


def less(a: Spread, b: Spread) -> str:
  """The verdict on "a < b" by the ordering rule of this module."""
  if a.n < 2 or b.n < 2:
    return ONE_SEED
  margin = a.std + b.std
  if b.mean - a.mean > margin:
    return REPRODUCED
  if a.mean - b.mean > margin:
    return CONTRADICTED
  return WITHIN_SPREAD


def all_less(verdicts: Sequence[str]) -> str:
  """The verdict on a conjunction of orderings: reproduced only if each is,
  contradicted if any is, else within the spread (or one seed)."""
  if not verdicts:
    return WITHIN_SPREAD
  if all(v == REPRODUCED for v in verdicts):
    return REPRODUCED
  if any(v == CONTRADICTED for v in verdicts):
    return CONTRADICTED
  return ONE_SEED if ONE_SEED in verdicts else WITHIN_SPREAD


def below(s: Spread, threshold: float) -> str:
  """The verdict on "s < threshold" by the same rule (the threshold has no
  spread): reproduced when mean + std < threshold, contradicted when mean - std
  > threshold."""
  if s.n < 2:
    return ONE_SEED
  if s.mean + s.std < threshold:
    return REPRODUCED
  if s.mean - s.std > threshold:
    return CONTRADICTED
  return WITHIN_SPREAD


def above(s: Spread, threshold: float) -> str:
  """The verdict on "s > threshold" (see `below`)."""
  return below(Spread(tuple(-v for v in s.values)), -threshold)
