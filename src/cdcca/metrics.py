"""Metrics, latency percentiles and the cosine schedule shared by the benchmarks, stages and tests; numpy
only, so any layer may use them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` for predicting ``labels`` (True = positive), ties
    counted half (Mann–Whitney U with average ranks). NaN when one class is empty."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def latency_ms(seconds: Sequence[float], digits: int = 1) -> dict[str, float]:
    """Median and 99th percentile of durations given in seconds, in milliseconds: how every benchmark
    quotes a latency."""
    ms = np.asarray(seconds, dtype=float) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), digits), "p99_ms": round(float(np.percentile(ms, 99)), digits)}


def cosine(start: float, end: float, frac: float) -> float:
    """A cosine schedule from ``start`` (frac 0) to ``end`` (frac 1): every learning-rate decay here."""
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * frac))
