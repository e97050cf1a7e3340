"""The device notices a shift from its own answers, so the loop can react before the round clock does.

Every request's uncertainty (the UTS sample score the device computes anyway) goes into a short recent
window and the longer baseline before it. When the recent mean rises above the baseline's mean by more than
``z`` standard errors of a window's mean (a one-sided z-test on the baseline's spread), the detector fires:
the device reports the shift in its queue status, raises its upload share for the requests after it, and a
driver that reacts to shifts starts an early round from the first uploads of the new domain. After firing, the
baseline restarts on the new domain, so a lasting shift is reported once; a ``cooldown`` keeps a noisy stream
from firing on every window.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass
class ShiftReport:
    """A detected shift: after how many served requests, and how far the recent window rose (z)."""

    at: int
    z: float


@dataclass
class ShiftDetector:
    z: float = 5.0              # standard errors the recent window's mean must rise by
    window: int = 20            # requests in the recent window
    baseline: int = 160         # requests before it that the rise is measured against (at most)
    min_baseline: int = 80      # no test before the baseline holds this many
    cooldown: int = 80          # requests after a firing before the next test
    served: int = 0
    last: ShiftReport | None = None
    _values: deque = field(default_factory=deque, repr=False)

    def __post_init__(self):
        if self.z <= 0 or self.window < 2 or self.min_baseline < 2 or self.baseline < self.min_baseline:
            raise ValueError("a shift detector needs z > 0, window ≥ 2 and baseline ≥ min_baseline ≥ 2")
        self._values = deque(maxlen=self.baseline + self.window)

    def observe(self, uncertainties: list[float]) -> ShiftReport | None:
        """Fold the served requests' uncertainties in, one by one; the report if a shift was detected among them."""
        fired = None
        for u in uncertainties:
            self.served += 1
            if math.isfinite(u):
                self._values.append(float(u))
            report = self._test()
            if report is not None:
                fired = self.last = report
                recent = list(self._values)[-self.window:]
                self._values.clear()
                self._values.extend(recent)            # the new domain is the next baseline
        return fired

    def _test(self) -> ShiftReport | None:
        values = list(self._values)
        if len(values) < self.min_baseline + self.window:
            return None
        if self.last is not None and self.served - self.last.at < self.cooldown:
            return None
        base, recent = values[:-self.window], values[-self.window:]
        mean = sum(base) / len(base)
        var = sum((v - mean) ** 2 for v in base) / (len(base) - 1)
        stderr = math.sqrt(max(var, 1e-12) / self.window)
        z = (sum(recent) / self.window - mean) / stderr
        return ShiftReport(self.served, round(z, 2)) if z > self.z else None
