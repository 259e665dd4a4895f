"""Violations and the alerts feed: a per-tenant log of the calls that broke a policy.

A violation's id is derived from (tenant, call, policy, pattern), and the feed
stores an id once (store/logs.py), so an event evaluated twice (redelivered
after a worker died) never yields a second copy. Its position in the feed (the
cursor) is a stream id: increasing, so a watcher that resumes after the last
cursor it received misses none and repeats none.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from spendgate_server.engine.anomalies import AnomalyKind, SettleAnomaly
from spendgate_server.store.logs import LogStore, entry_id_ms, parse_entry_id

__all__ = [
    "VIOLATIONS_LOG",
    "WEBHOOK_GROUP",
    "PatternHit",
    "PolicyType",
    "Violation",
    "ViolationFeed",
    "ViolationFilter",
    "violation_id",
]

VIOLATIONS_LOG = "violations"
WEBHOOK_GROUP = "webhook"


class PolicyType(enum.IntEnum):
    """Values are the wire codes of spendgate.v1.PolicyType."""

    APPROVED_MODELS = 1
    BANNED_PATTERNS = 2
    KEY_ENVIRONMENT_CHECK = 3
    APPROVAL_REQUIRED_THRESHOLD = 4
    # Built in, always on: a settle that does not match its decision (engine/anomalies.py).
    SETTLE_ANOMALY = 5

    @property
    def key(self) -> str:
        """The user-facing policy name."""
        return _KEYS[self]

    @classmethod
    def from_key(cls, key: str) -> PolicyType:
        """The type named ``key`` (``approved_models``, ...).

        Raises:
            ValueError: no such policy.
        """
        for member, name in _KEYS.items():
            if name == key:
                return member
        raise ValueError(f"unknown policy type {key!r}; expected one of {', '.join(_KEYS.values())}")


_KEYS = {
    PolicyType.APPROVED_MODELS: "approved_models",
    PolicyType.BANNED_PATTERNS: "banned_patterns",
    PolicyType.KEY_ENVIRONMENT_CHECK: "key_environment_check",
    PolicyType.APPROVAL_REQUIRED_THRESHOLD: "approval_required_threshold_cents",
    PolicyType.SETTLE_ANOMALY: "settle_anomaly",
}


def violation_id(tenant: str, decision_id: str, policy_type: PolicyType, item: str = "") -> str:
    """The id of the violation of ``policy_type`` (and ``item``, a pattern id) by one call."""
    key = "\x00".join((tenant, decision_id, str(int(policy_type)), item))
    return hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class PatternHit:
    """Where a banned pattern matched; never the matched text."""

    pattern_id: str
    pattern: str
    offset: int
    redacted_excerpt: str = ""
    matched_on_client: bool = False


@dataclass(frozen=True, slots=True)
class Violation:
    """One call that broke one policy."""

    violation_id: str
    policy_type: PolicyType
    message: str
    call_time_ms: int
    decision_id: str
    session_id: str
    project: str
    requested_model: str
    effective_model: str
    environment: str
    key_fingerprint: str
    key_label: str
    cost_nano_usd: int
    policy_version: int
    pattern: PatternHit | None = None
    approved_models: tuple[str, ...] = ()
    permitted_environments: tuple[str, ...] = ()
    threshold_cents: int = 0
    # Set for SETTLE_ANOMALY: what the settle reported against what Decide admitted.
    anomaly: SettleAnomaly | None = None
    # Its position in the feed; empty until stored.
    cursor: str = field(default="", compare=False)

    @property
    def create_time_ms(self) -> int:
        """When it was stored in the feed (0 before)."""
        return entry_id_ms(self.cursor) if self.cursor else 0

    def to_json(self) -> str:
        """The stored form (without the cursor, which the feed assigns)."""
        raw = asdict(self)
        del raw["cursor"]
        raw["policy_type"] = self.policy_type.key
        return json.dumps(raw, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, cursor: str = "") -> Violation:
        """Parse what to_json wrote."""
        raw: dict[str, Any] = json.loads(text)
        raw["policy_type"] = PolicyType.from_key(raw["policy_type"])
        raw["pattern"] = PatternHit(**raw["pattern"]) if raw.get("pattern") else None
        raw["approved_models"] = tuple(raw.get("approved_models", ()))
        raw["permitted_environments"] = tuple(raw.get("permitted_environments", ()))
        anomaly = raw.get("anomaly")
        raw["anomaly"] = (
            SettleAnomaly(**{**anomaly, "kind": AnomalyKind(anomaly["kind"])}) if anomaly else None
        )
        return cls(**raw, cursor=cursor)

    def webhook_payload(self, tenant: str) -> dict[str, Any]:
        """The JSON object a webhook receives."""
        raw: dict[str, Any] = json.loads(self.to_json())
        return {"tenant": tenant, "cursor": self.cursor, "create_time_ms": self.create_time_ms, **raw}


@dataclass(frozen=True, slots=True)
class ViolationFilter:
    """Which violations a reader wants; unset fields match all."""

    policy_type: PolicyType | None = None
    session_id: str = ""
    project: str = ""

    def matches(self, violation: Violation) -> bool:
        """Whether ``violation`` passes."""
        return (
            (self.policy_type is None or violation.policy_type is self.policy_type)
            and (not self.session_id or violation.session_id == self.session_id)
            and (not self.project or violation.project == self.project)
        )


class ViolationFeed:
    """The alerts feed over a LogStore.

    Args:
        logs: the log store.
        max_entries: each tenant's feed keeps its newest this many violations.
        dedup_window_ms: how long a violation id is remembered; longer than any
            journal event can wait to be (re)evaluated.
    """

    def __init__(self, logs: LogStore, *, max_entries: int, dedup_window_ms: int) -> None:
        self.logs = logs
        self._max_entries = max_entries
        self._dedup_window_ms = dedup_window_ms

    async def add(self, tenant: str, violations: Sequence[Violation], now_ms: int) -> int:
        """Store the violations whose ids are new, atomically; returns how many were."""
        if not violations:
            return 0
        result = await self.logs.append(
            VIOLATIONS_LOG,
            tenant,
            [(v.violation_id, v.to_json()) for v in violations],
            max_entries=self._max_entries,
            unique_ttl_ms=self._dedup_window_ms,
            now_ms=now_ms,
        )
        return result.added

    async def after(self, tenant: str, cursor: str, count: int) -> list[Violation]:
        """Up to ``count`` violations after ``cursor`` ("0-0": from the oldest kept), oldest first."""
        entries = await self.logs.after(VIOLATIONS_LOG, tenant, cursor, count)
        return [Violation.from_json(e.payload, e.entry_id) for e in entries]

    async def page(
        self,
        tenant: str,
        *,
        before: str,
        since_ms: int,
        until_ms: int | None,
        where: ViolationFilter,
        page_size: int,
        scan_limit: int,
    ) -> tuple[list[Violation], str]:
        """Newest first: up to ``page_size`` matching violations found in [since_ms, until_ms),
        before cursor ``before`` (empty: the newest). At most ``scan_limit`` entries are read;
        the second value is where the next page starts, empty when nothing older is left."""
        cursor = before
        if until_ms is not None:
            bound = f"{until_ms}-0"
            if not cursor or parse_entry_id(bound) < parse_entry_id(cursor):
                cursor = bound
        low = f"{since_ms}-0"
        found: list[Violation] = []
        scanned = 0
        while scanned < scan_limit:
            want = min(max(page_size, 100), scan_limit - scanned)
            entries = await self.logs.before(VIOLATIONS_LOG, tenant, cursor, low, want)
            for entry in entries:
                scanned += 1
                cursor = entry.entry_id
                violation = Violation.from_json(entry.payload, entry.entry_id)
                if where.matches(violation):
                    found.append(violation)
                    if len(found) == page_size:
                        break
            if len(found) == page_size or len(entries) < want:
                break
        more = await self.logs.before(VIOLATIONS_LOG, tenant, cursor, low, 1) if cursor else []
        return found, cursor if more else ""

    async def last_cursor(self, tenant: str) -> str:
        """The newest violation's cursor ("0-0" when there is none)."""
        return await self.logs.last_id(VIOLATIONS_LOG, tenant)

    async def wait(self, tenant: str, cursor: str, timeout_seconds: float) -> None:
        """Return when violations after ``cursor`` may exist, or after the timeout."""
        await self.logs.wait(VIOLATIONS_LOG, tenant, cursor, timeout_seconds)
