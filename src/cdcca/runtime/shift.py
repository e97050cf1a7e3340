"""The device notices a shift from what it serves, so the loop can react before the round clock does.

Two signals, one test layout: a short recent window of requests against the longer baseline before it.

- ``tokens`` (the default): each request's visual tokens pooled over positions, one vector. The recent
  window's mean is projected on the baseline's top principal components and compared with the baseline's
  mean, per component, in units of its standard error (a diagonal Hotelling test). Under no shift the mean
  squared ratio is ~1, so ``z`` = (ratio − 1) / sqrt(2 / k). Two-sided: any move of the image statistics
  counts, whether the device grows more or less sure of itself. On the built-in persistent stream the
  frozen device's uncertainty does not move at a shift (it is confidently wrong under pixelation), while
  this test read z 19 to 109 twenty requests after each shift and at most 1.6 inside a domain.
- ``uncertainty``: the UTS sample scores the device computes anyway; a one-sided z-test of the recent
  mean against the baseline's spread (a drop is not a shift).

When the test exceeds ``z`` the detector fires: the device reports the shift in its queue status, raises its
upload share for the requests after it, and a driver that reacts to shifts starts an early round from the
first uploads of the new domain. After firing, the baseline restarts on the new domain, so a lasting shift
is reported once; a ``cooldown`` keeps a noisy stream from firing on every window.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ShiftReport:
    """A detected shift: after how many served requests, and how far the recent window moved (z)."""

    at: int
    z: float


@dataclass
class ShiftDetector:
    z: float = 5.0              # standard errors the recent window must move by
    window: int = 20            # requests in the recent window
    baseline: int = 160         # requests before it that the move is measured against (at most)
    min_baseline: int = 80      # no test before the baseline holds this many
    cooldown: int = 80          # requests after a firing before the next test
    components: int = 16        # vector signals: the baseline's principal components the test reads
    served: int = 0
    last: ShiftReport | None = None
    _values: deque = field(default_factory=deque, repr=False)

    @classmethod
    def seeded(cls, source, **settings) -> ShiftDetector:
        """A detector whose first baseline is ``source`` (pooled tokens of clean source images, from the pair's
        token statistics): the stream's very first shift, away from the data the pair trained on, is then
        detected too, not only the shifts after the device has served a baseline of its own."""
        detector = cls(**settings)
        detector._values.extend(np.asarray(source, dtype=np.float64)[-detector.baseline:])
        return detector

    def __post_init__(self):
        if self.z <= 0 or self.window < 2 or self.min_baseline < 2 or self.baseline < self.min_baseline \
                or self.components < 1:
            raise ValueError("a shift detector needs z > 0, window ≥ 2, baseline ≥ min_baseline ≥ 2 and "
                             "components ≥ 1")
        self._values = deque(maxlen=self.baseline + self.window)

    def observe(self, signals) -> ShiftReport | None:
        """Fold the served requests' signals in, one by one (floats: uncertainties; rows of an (N, C) array:
        pooled tokens); the report if a shift was detected among them."""
        fired = None
        for value in signals:
            self.served += 1
            value = np.asarray(value, dtype=np.float64)
            if np.isfinite(value).all():
                self._values.append(value)
            report = self._test()
            if report is not None:
                fired = self.last = report
                recent = list(self._values)[-self.window:]
                self._values.clear()
                self._values.extend(recent)            # the new domain is the next baseline
        return fired

    def _test(self) -> ShiftReport | None:
        if len(self._values) < self.min_baseline + self.window:
            return None
        if self.last is not None and self.served - self.last.at < self.cooldown:
            return None
        values = np.stack(list(self._values))
        base, recent = values[:-self.window], values[-self.window:]
        z = _vector_z(base, recent, self.components) if values.ndim == 2 else _scalar_z(base, recent)
        return ShiftReport(self.served, round(z, 2)) if z > self.z else None


def _scalar_z(base: np.ndarray, recent: np.ndarray) -> float:
    """How many standard errors the recent mean rose above the baseline's (one-sided)."""
    stderr = math.sqrt(max(float(base.var(ddof=1)), 1e-12) / len(recent))
    return float((recent.mean() - base.mean()) / stderr)


def _vector_z(base: np.ndarray, recent: np.ndarray, components: int) -> float:
    """The recent mean's move from the baseline's on its top principal components, as a z of the mean
    squared standardized move (≈ 0 without a shift, whatever the direction of one). The components come from
    the baseline's Gram matrix (B × B, B ≤ 160), not from the C-wide covariance: a millisecond a test."""
    centre = base.mean(0)
    centred = base - centre
    eigval, eigvec = np.linalg.eigh(centred @ centred.T)
    top = np.argsort(eigval)[::-1][:components]
    top = top[eigval[top] > 1e-9 * max(float(eigval.max()), 1e-30)]
    if len(top) == 0:
        return 0.0
    scores = eigvec[:, top] * np.sqrt(eigval[top])            # the baseline on its principal axes
    axes = (eigvec[:, top].T @ centred) / np.sqrt(eigval[top])[:, None]
    var = np.maximum(scores.var(0, ddof=1), 1e-12)
    move = axes @ (recent.mean(0) - centre)
    ratio = float(np.mean(move ** 2 / (var * (1 / len(recent) + 1 / len(base)))))
    return (ratio - 1) / math.sqrt(2 / len(top))
