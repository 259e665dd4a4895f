"""A session's spend over time as a small bar chart, drawn server-side as inline SVG.

No chart library and no script: the bars are ``<rect>`` elements whose geometry is
computed here (SVG attributes, not inline styles, so the strict CSP holds), coloured by
the stylesheet. Every chart comes with its words: a one-sentence summary (the chart's
accessible name) and the minutes themselves as a table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from spendgate_server.store.insights import MINUTE_MS, SpendPoint

__all__ = ["Bar", "SpendChart", "spend_chart"]

WIDTH, HEIGHT = 300, 64
# A chart spans at least this long, so a new session's one minute is a bar, not the whole chart.
MIN_SPAN_MINUTES = 30
# More minutes than this are summed into buckets of several minutes each.
MAX_BARS = 120


@dataclass(frozen=True, slots=True)
class Bar:
    """One bucket: where it is drawn, the minutes it covers and what was spent in them."""

    x: float
    y: float
    width: float
    height: float
    start_ms: int
    minutes: int
    cost_nano_usd: int


@dataclass(frozen=True, slots=True)
class SpendChart:
    """The drawing and the figures its text alternative states."""

    bars: tuple[Bar, ...]
    width: int
    height: int
    start_ms: int
    end_ms: int
    bucket_minutes: int
    total_nano_usd: int
    peak: Bar
    points: tuple[SpendPoint, ...]


def spend_chart(points: Sequence[SpendPoint], end_ms: int) -> SpendChart | None:
    """Bars of settled spend per minute (or per few minutes) up to ``end_ms``; None without any spend.

    Args:
        points: the session's spend per minute, oldest first (GetSessionSpend).
        end_ms: the chart's right edge, e.g. when the session was last seen.
    """
    spent = [p for p in points if p.cost_nano_usd > 0]
    if not spent:
        return None
    last = max(end_ms, spent[-1].minute_start_ms) // MINUTE_MS
    first = min(spent[0].minute_start_ms // MINUTE_MS, last - MIN_SPAN_MINUTES + 1)
    minutes = last - first + 1
    bucket = -(-minutes // MAX_BARS)
    count = -(-minutes // bucket)
    sums = [0] * count
    for p in spent:
        sums[(p.minute_start_ms // MINUTE_MS - first) // bucket] += p.cost_nano_usd
    top = max(sums)
    slot = WIDTH / count
    gap = 1.0 if slot >= 4 else 0.0
    bars = []
    for i, cost in enumerate(sums):
        if not cost:
            continue
        # A bar is never thinner than one unit: a small spend stays visible beside a large one.
        height = max(1.0, round(cost / top * (HEIGHT - 2), 2))
        bars.append(
            Bar(
                x=round(i * slot, 2),
                y=round(HEIGHT - height, 2),
                width=round(slot - gap, 2),
                height=height,
                start_ms=(first + i * bucket) * MINUTE_MS,
                minutes=bucket,
                cost_nano_usd=cost,
            )
        )
    return SpendChart(
        bars=tuple(bars),
        width=WIDTH,
        height=HEIGHT,
        start_ms=first * MINUTE_MS,
        end_ms=(last + 1) * MINUTE_MS,
        bucket_minutes=bucket,
        total_nano_usd=sum(sums),
        peak=max(bars, key=lambda b: b.cost_nano_usd),
        points=tuple(spent),
    )
