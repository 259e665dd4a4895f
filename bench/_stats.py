"""Percentiles and ratios: the arithmetic of the report, kept apart so it can be tested."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["PERCENTILES", "percentile", "ratio", "summarize"]

PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values (NaN when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


def summarize(samples_us: Sequence[int]) -> dict[str, float]:
    """Latency percentiles, mean and max in milliseconds."""
    values = sorted(samples_us)
    summary = {name: percentile(values, pct) / 1000 for name, pct in PERCENTILES}
    summary["max"] = values[-1] / 1000 if values else math.nan
    summary["mean"] = sum(values) / len(values) / 1000 if values else math.nan
    return summary


def ratio(value: float | None, floor: float | None) -> float | None:
    """value / floor, or None when either is missing or the floor is zero."""
    if value is None or floor is None or floor == 0 or math.isnan(value) or math.isnan(floor):
        return None
    return value / floor
