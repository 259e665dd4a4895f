"""What the engine emits once a call is settled: the event, and the port it is sent to.

The policy pipeline (policy/journal.py) implements :class:`Journal` over its log store;
the engine knows only this interface, so the decision core never depends on the pipeline.

A journal may also keep *intents* (:meth:`Journal.intend`): the engine starts writing
the event, as far as it is known before the store's reply, together with the settle
script, and once both are stored it answers the Settle and appends the final event in
the background; an intent whose append never happened is finished by a sweeper.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Any

from spendgate_server.engine.anomalies import AnomalyKind, SettleAnomaly

__all__ = ["CallContext", "Journal", "JournalEvent", "JournalIntent"]


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
        """The stored form: every field in order, the context without its empty fields, and
        ``anomalies`` only when there are any.

        Built field by field rather than with ``dataclasses.asdict``, which measured about
        60 µs an event (its deep copy); every Settle serializes its event twice (the
        intent, then the event).
        """
        raw: dict[str, Any] = {name: getattr(self, name) for name in _EVENT_FIELDS}
        context = self.context
        raw["context"] = {
            name: value
            for name in _CONTEXT_FIELDS
            if (value := getattr(context, name)) not in ("", 0, False, ())
        }
        if self.anomalies:
            raw["anomalies"] = [{name: getattr(a, name) for name in _ANOMALY_FIELDS} for a in self.anomalies]
        return _ENCODER.encode(raw)

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


_EVENT_FIELDS = tuple(f.name for f in fields(JournalEvent) if f.name not in ("context", "anomalies"))
_CONTEXT_FIELDS = tuple(f.name for f in fields(CallContext))
_ANOMALY_FIELDS = tuple(f.name for f in fields(SettleAnomaly))
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


class JournalIntent(ABC):
    """The intent of one settle's event, being written while the settle runs (Journal.intend)."""

    @abstractmethod
    async def recorded(self) -> bool:
        """Wait for the intent's write: True when it is stored (the event may then be appended
        after the Settle is answered), False when it failed (the caller awaits the append)."""

    @abstractmethod
    def commit(self, event: JournalEvent) -> None:
        """Append the final ``event`` in the background; the append removes the intent.

        If the append fails, or the process dies first, the intent stays for the sweeper.
        """

    @abstractmethod
    def abandon(self) -> None:
        """Remove the intent in the background, best effort: its settle changed nothing."""


class Journal(ABC):
    """Where the engine records settled calls."""

    @abstractmethod
    async def append(self, event: JournalEvent, dedup_window_ms: int) -> None:
        """Record ``event`` unless its decision id was recorded within ``dedup_window_ms``.

        Raises:
            StoreUnavailable: not recorded; the caller fails so that the client retries.
        """

    def intend(self, draft: JournalEvent, dedup_window_ms: int) -> JournalIntent | None:
        """Start writing the intent of ``draft`` now, in the caller's event-loop turn.

        ``draft`` is the event as known before the settle's store reply: the cost priced
        from the reported usage and no anomalies. None when this journal keeps no intents:
        the caller then awaits :meth:`append`.
        """
        return None
