"""Small bar charts over time, drawn server-side as inline SVG: a session's spend, violations found.

No chart library and no script: the bars are ``<rect>`` elements whose geometry is
computed here (SVG attributes, not inline styles, so the strict CSP holds), coloured by
the stylesheet. Every chart comes with its words: a one-sentence summary (the chart's
accessible name) and its figures as a table.

A chart spans at least ``MIN_SPAN_MINUTES`` and has at most ``MAX_BARS`` bars. With a
handful of points each bar is a block a tenth of the chart wide, not a hairline against
an empty frame, and has its value written above it; a long day is summed into buckets of
several minutes, and only its peak is labelled. Charts keep their aspect ratio (the
labels are SVG text), so they grow with the page instead of stretching.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from spendgate_server.money import format_usd
from spendgate_server.store.insights import MINUTE_MS, SpendPoint

__all__ = [
    "Bar",
    "Buckets",
    "CountBar",
    "CountChart",
    "SpendChart",
    "buckets_for",
    "count_chart",
    "spend_chart",
]

WIDTH, HEIGHT = 300, 64
# A chart spans at least this long, so a new session's one minute is a bar among a few, not a
# sliver at the edge of half an hour.
MIN_SPAN_MINUTES = 10
# More minutes than this are summed into buckets of several minutes each (a bar stays >= 4 units wide).
MAX_BARS = 60
# Room above the tallest bar for its value, and the room a value needs beside its neighbour's.
LABEL_HEADROOM = 14.0
LABEL_WIDTH = 44.0


@dataclass(frozen=True, slots=True)
class Buckets:
    """Minutes from ``first_minute`` cut into ``count`` buckets of ``minutes`` each."""

    first_minute: int
    minutes: int
    count: int

    def index(self, unix_ms: int) -> int:
        """The bucket holding ``unix_ms`` (within the span)."""
        return (unix_ms // MINUTE_MS - self.first_minute) // self.minutes

    def start_ms(self, index: int) -> int:
        """When bucket ``index`` starts."""
        return (self.first_minute + index * self.minutes) * MINUTE_MS

    @property
    def end_ms(self) -> int:
        """When the last bucket ends."""
        return self.start_ms(self.count)


def buckets_for(first_ms: int, last_ms: int) -> Buckets:
    """Buckets covering ``first_ms`` to ``last_ms``: at least MIN_SPAN_MINUTES, at most MAX_BARS buckets.

    The span ends with the minute of ``last_ms`` and reaches back at least MIN_SPAN_MINUTES.
    """
    last = last_ms // MINUTE_MS
    first = min(first_ms // MINUTE_MS, last - MIN_SPAN_MINUTES + 1)
    minutes = last - first + 1
    size = -(-minutes // MAX_BARS)
    # Whole buckets ending at the last minute: the first one may reach back a little further.
    count = -(-minutes // size)
    return Buckets(last + 1 - count * size, size, count)


@dataclass(frozen=True, slots=True)
class _Shape:
    """Where one value's bar goes, and whether and where its value is written."""

    index: int
    x: float
    y: float
    width: float
    height: float
    labelled: bool
    label_x: float
    label_anchor: str


def _geometry(values: Sequence[int], width: float, height: float, *, labels: bool) -> list[_Shape]:
    """The bar of each non-zero value, the largest full height (less room for the labels).

    With ``labels``, every bar's value is written above it when the bars stand far enough
    apart for the values not to touch (a handful of points), else only the peak's.
    """
    top = max(values, default=0)
    if not top:
        return []
    slot = width / len(values)
    gap = 1.0 if slot >= 4 else 0.0
    room = height - 2 - (LABEL_HEADROOM if labels else 0.0)
    drawn = [i for i, value in enumerate(values) if value]
    centres = [(i + 0.5) * slot for i in drawn]
    apart = all(b - a >= LABEL_WIDTH for a, b in itertools.pairwise(centres))
    peak = values.index(top)
    shapes = []
    for i in drawn:
        # A bar is never thinner than one unit: a small value stays visible beside a large one.
        bar_height = max(1.0, round(values[i] / top * room, 2))
        x, bar_width = round(i * slot, 2), round(slot - gap, 2)
        centre = x + bar_width / 2
        # A value near an edge is written inward, so it is never cut off.
        anchor, label_x = "middle", centre
        if centre < LABEL_WIDTH / 2:
            anchor, label_x = "start", x
        elif centre > width - LABEL_WIDTH / 2:
            anchor, label_x = "end", x + bar_width
        shapes.append(
            _Shape(
                index=i,
                x=x,
                y=round(height - bar_height, 2),
                width=bar_width,
                height=bar_height,
                labelled=labels and (apart or i == peak),
                label_x=round(label_x, 2),
                label_anchor=anchor,
            )
        )
    return shapes


@dataclass(frozen=True, slots=True)
class Bar:
    """One bucket of spend: where it is drawn, the minutes it covers and what was spent in them."""

    x: float
    y: float
    width: float
    height: float
    start_ms: int
    minutes: int
    cost_nano_usd: int
    label: str = ""  # the amount, written above the bar when there is room
    label_x: float = 0.0
    label_anchor: str = "middle"


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
    buckets = buckets_for(spent[0].minute_start_ms, max(end_ms, spent[-1].minute_start_ms))
    sums = [0] * buckets.count
    for p in spent:
        sums[buckets.index(p.minute_start_ms)] += p.cost_nano_usd
    bars = tuple(
        Bar(
            x=b.x,
            y=b.y,
            width=b.width,
            height=b.height,
            start_ms=buckets.start_ms(b.index),
            minutes=buckets.minutes,
            cost_nano_usd=sums[b.index],
            label=format_usd(sums[b.index]) if b.labelled else "",
            label_x=b.label_x,
            label_anchor=b.label_anchor,
        )
        for b in _geometry(sums, WIDTH, HEIGHT, labels=True)
    )
    return SpendChart(
        bars=bars,
        width=WIDTH,
        height=HEIGHT,
        start_ms=buckets.start_ms(0),
        end_ms=buckets.end_ms,
        bucket_minutes=buckets.minutes,
        total_nano_usd=sum(sums),
        peak=max(bars, key=lambda b: b.cost_nano_usd),
        points=tuple(spent),
    )


@dataclass(frozen=True, slots=True)
class CountBar:
    """One bucket of events: where it is drawn, when it starts and how many fell in it."""

    x: float
    y: float
    width: float
    height: float
    start_ms: int
    count: int
    label: str = ""  # the count, written above the bar when there is room
    label_x: float = 0.0
    label_anchor: str = "middle"


@dataclass(frozen=True, slots=True)
class CountChart:
    """Events per bucket: the drawing, and the figures its words state."""

    bars: tuple[CountBar, ...]
    width: int
    height: int
    start_ms: int
    end_ms: int
    bucket_minutes: int
    total: int
    peak: CountBar


def count_chart(
    times_ms: Sequence[int],
    buckets: Buckets,
    *,
    width: int = WIDTH,
    height: int = HEIGHT,
    labels: bool = True,
) -> CountChart | None:
    """How many of ``times_ms`` fall in each of ``buckets``; None when none does.

    ``labels`` False draws the bars alone (a sparkline).
    """
    counts = [0] * buckets.count
    for t in times_ms:
        i = buckets.index(t)
        if 0 <= i < buckets.count:
            counts[i] += 1
    bars = tuple(
        CountBar(
            x=b.x,
            y=b.y,
            width=b.width,
            height=b.height,
            start_ms=buckets.start_ms(b.index),
            count=counts[b.index],
            label=str(counts[b.index]) if b.labelled else "",
            label_x=b.label_x,
            label_anchor=b.label_anchor,
        )
        for b in _geometry(counts, width, height, labels=labels)
    )
    if not bars:
        return None
    return CountChart(
        bars=bars,
        width=width,
        height=height,
        start_ms=buckets.start_ms(0),
        end_ms=buckets.end_ms,
        bucket_minutes=buckets.minutes,
        total=sum(counts),
        peak=max(bars, key=lambda b: b.count),
    )
