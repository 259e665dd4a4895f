"""The journal: every settled call as an event in its tenant's bounded log (a Redis Stream).

The engine appends after a settle succeeds, through the :class:`Journal`
interface. The append is idempotent per decision id, so the engine appends on a
repeated settle too: if a server dies between the settle and the append, the
client's retry (Settle is retried on UNAVAILABLE) finds the call already settled
and journals it then, once. A call is lost from the journal only if the server
dies in that window and the client never retries (it died too, or stayed cut
off longer than its retry window of 10 minutes). A failed append fails the
Settle with UNAVAILABLE, which the client retries the same way.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from spendgate_server.store.logs import LogStore

__all__ = [
    "EVALUATOR_GROUP",
    "JOURNAL_LOG",
    "CallContext",
    "Journal",
    "JournalEvent",
    "StoreJournal",
]

JOURNAL_LOG = "journal"
EVALUATOR_GROUP = "evaluators"


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

    @property
    def requested_model(self) -> str:
        """The model asked for; the effective one when the client did not say."""
        return self.context.requested_model or self.effective_model

    def to_json(self) -> str:
        """The stored form."""
        raw = asdict(self)
        raw["context"] = {k: v for k, v in raw["context"].items() if v not in ("", 0, False, ())}
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
            return cls(**raw, context=CallContext(**context))
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


class StoreJournal(Journal):
    """The journal in a LogStore (Redis Streams or memory), one bounded log per tenant.

    Args:
        logs: the log store.
        max_entries: each tenant's journal keeps its newest this many events.
        journals_prompts: whether a tenant enabled prompt journaling; prompt text of
            any other tenant is dropped before it is stored.
    """

    def __init__(
        self, logs: LogStore, *, max_entries: int, journals_prompts: Callable[[str], Awaitable[bool]]
    ) -> None:
        self._logs = logs
        self._max_entries = max_entries
        self._journals_prompts = journals_prompts

    async def append(self, event: JournalEvent, dedup_window_ms: int) -> None:
        if event.context.prompt_text and not await self._journals_prompts(event.tenant):
            event = replace(event, context=replace(event.context, prompt_text="", prompt_truncated=False))
        await self._logs.append(
            JOURNAL_LOG,
            event.tenant,
            [(event.decision_id, event.to_json())],
            max_entries=self._max_entries,
            unique_ttl_ms=dedup_window_ms,
            now_ms=event.time_ms,
        )
