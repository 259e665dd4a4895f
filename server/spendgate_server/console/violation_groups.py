"""The Violations page's summary: the last day's violations grouped by policy and what broke it.

A runaway agent repeats one violation many times; shown one by one they are a wall of
near-identical cards. Grouped, each kind is one row: the policy, what broke it (the
pattern, the model, the key and environment, the threshold), how many, in how many
sessions, when last, and a small chart of when; above the rows, one chart of them all.

The service has no aggregate call, so the newest ``WINDOW_LIMIT`` violations of the window
are read (a few ListViolations pages) and counted here; the page says when there were more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from spendgate_server.console.charts import Buckets, CountChart, buckets_for, count_chart
from spendgate_server.policy.violations import PolicyType, Violation

__all__ = [
    "WINDOW_HOURS",
    "WINDOW_LIMIT",
    "Group",
    "ViolationGroup",
    "ViolationSummary",
    "group_of",
    "summarize",
]

WINDOW_HOURS = 24
# The most violations read for the summary (ListViolations pages of up to 500).
WINDOW_LIMIT = 2000
SPARK_WIDTH, SPARK_HEIGHT = 120, 24
SUMMARY_WIDTH, SUMMARY_HEIGHT = 600, 80  # drawn across the page: wider, so not as tall


@dataclass(frozen=True, slots=True)
class Group:
    """What makes two violations the same kind: their policy and what broke it."""

    key: str  # stable across page loads: the live feed finds a violation's row by it
    policy_type: PolicyType
    what: str  # shown as code: the pattern id, the model, the key, the threshold
    detail: str  # in words beside it: the pattern, the environment


def group_of(v: Violation) -> Group:
    """The kind of ``v``."""
    policy = v.policy_type
    if policy is PolicyType.BANNED_PATTERNS:
        pattern_id = v.pattern.pattern_id if v.pattern else "?"
        detail = v.pattern.pattern if v.pattern else ""
        return Group(f"{policy.key}:{pattern_id}", policy, pattern_id, detail)
    if policy is PolicyType.APPROVED_MODELS:
        return Group(f"{policy.key}:{v.effective_model}", policy, v.effective_model, "")
    if policy is PolicyType.KEY_ENVIRONMENT_CHECK:
        key = v.key_label or (f"fingerprint {v.key_fingerprint[:12]}…" if v.key_fingerprint else "?")
        where = f"used in {v.environment}" if v.environment else "used with no environment"
        return Group(f"{policy.key}:{key}:{v.environment}", policy, key, where)
    return Group(f"{policy.key}:{v.threshold_cents}", policy, f"over {v.threshold_cents} cents", "")


@dataclass(frozen=True, slots=True)
class ViolationGroup:
    """One kind of violation over the window."""

    group: Group
    count: int
    sessions: int
    last_ms: int
    trend: CountChart | None  # the same buckets as the summary's chart, drawn small


@dataclass(frozen=True, slots=True)
class ViolationSummary:
    """The window's violations: totals, one chart, and the groups, most violations first."""

    since_ms: int
    total: int
    sessions: int
    groups: tuple[ViolationGroup, ...]
    chart: CountChart | None
    complete: bool  # False: the window held more than WINDOW_LIMIT; these are the newest


def summarize(
    violations: Sequence[Violation], since_ms: int, now_ms: int, *, complete: bool
) -> ViolationSummary:
    """Group ``violations`` (found from ``since_ms`` to ``now_ms``) and chart them.

    Args:
        violations: the window's violations, in any order.
        since_ms: the window's start (Unix ms).
        now_ms: its end: the chart's right edge (a violation found later widens it).
        complete: ``violations`` are all of the window's, not only the newest.
    """
    times = [v.create_time_ms for v in violations]
    buckets: Buckets = buckets_for(min(times, default=now_ms), max([now_ms, *times]))
    by_group: dict[Group, list[Violation]] = {}
    for v in violations:
        by_group.setdefault(group_of(v), []).append(v)
    groups = tuple(
        sorted(
            (
                ViolationGroup(
                    group=group,
                    count=len(members),
                    sessions=len({v.session_id for v in members}),
                    last_ms=max(v.create_time_ms for v in members),
                    trend=count_chart(
                        [v.create_time_ms for v in members],
                        buckets,
                        width=SPARK_WIDTH,
                        height=SPARK_HEIGHT,
                        labels=False,
                    ),
                )
                for group, members in by_group.items()
            ),
            key=lambda g: (-g.count, -g.last_ms, g.group.key),
        )
    )
    return ViolationSummary(
        since_ms=since_ms,
        total=len(violations),
        sessions=len({v.session_id for v in violations}),
        groups=groups,
        chart=count_chart(times, buckets, width=SUMMARY_WIDTH, height=SUMMARY_HEIGHT),
        complete=complete,
    )
