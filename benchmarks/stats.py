"""Percentiles of timing samples (no heavy imports: the --gpu path uses them too)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

__all__ = ["p50", "p90", "p99"]


def p50(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _nearest_rank(xs: Sequence[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def p90(xs: Sequence[float]) -> float:
    return _nearest_rank(xs, 0.9)


def p99(xs: Sequence[float]) -> float:
    return _nearest_rank(xs, 0.99)
