"""What the engine emits once a call is settled: the event, and the port it is sent to.

The policy pipeline (policy/journal.py) implements :class:`Journal` over its log store;
the engine knows only this interface, so the decision core never depends on the pipeline.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any

from spendgate_server.engine.anomalies import AnomalyKind, SettleAnomaly

__all__ = ["CallContext", "Journal", "JournalEvent"]


@dataclass(frozen=True, slots=True)
class CallContext:
    """What the client knows about a call beyond its usage (all optional, SettleRequest fields)."""

    requested_model: str = ""
    # "allow" or "allow_downgraded"; empty when the client did not say.
    verdict: str = ""
    project: str = ""
    key_fingerprint: str = ""
    key_label: str = ""
    environment: str = ""
    prompt_text: str = ""
    prompt_truncated: bool = False
    pattern_set_version: int = 0
    # (pattern id, character offset of its first match) per pattern the client matched.
    pattern_matches: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class JournalEvent:
    """One settled call. ``decision_id`` (= the reservation id) identifies it."""

    decision_id: str
    tenant: str
    session_id: str
    time_ms: int
    effective_model: str
    provider_ok: bool
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int
    cache_write_input_tokens: int
    cost_nano_usd: int
    context: CallContext = field(default_factory=CallContext)
    # How the settle differs from its decision (engine/anomalies.py); flagged on the alerts feed.
    anomalies: tuple[SettleAnomaly, ...] = ()

    @property
    def requested_model(self) -> str:
        """The model asked for; the effective one when the client did not say."""
        return self.context.requested_model or self.effective_model

    def to_json(self) -> str:
        """The stored form."""
        raw = asdict(self)
        raw["context"] = {k: v for k, v in raw["context"].items() if v not in ("", 0, False, ())}
        if not raw["anomalies"]:
            del raw["anomalies"]
        return json.dumps(raw, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> JournalEvent:
        """Parse what to_json wrote.

        Raises:
            ValueError: not a journal event.
        """
        try:
            raw: dict[str, Any] = json.loads(text)
            context = dict(raw.pop("context", {}))
            context["pattern_matches"] = tuple(
                (str(pid), int(offset)) for pid, offset in context.get("pattern_matches", ())
            )
            anomalies = tuple(
                SettleAnomaly(**{**a, "kind": AnomalyKind(a["kind"])}) for a in raw.pop("anomalies", ())
            )
            return cls(**raw, context=CallContext(**context), anomalies=anomalies)
        except (TypeError, KeyError) as exc:
            raise ValueError(f"not a journal event: {exc}") from exc


class Journal(ABC):
    """Where the engine records settled calls."""

    @abstractmethod
    async def append(self, event: JournalEvent, dedup_window_ms: int) -> None:
        """Record ``event`` unless its decision id was recorded within ``dedup_window_ms``.

        Raises:
            StoreUnavailable: not recorded; the caller fails so that the client retries.
        """
