"""The journal event's stored form: field by field, exactly what ``dataclasses.asdict`` gave."""

from __future__ import annotations

import json
from dataclasses import asdict

from hypothesis import given
from hypothesis import strategies as st
from spendgate_server.engine.anomalies import AnomalyKind, SettleAnomaly
from spendgate_server.engine.events import CallContext, JournalEvent

text = st.text(max_size=12)
count = st.integers(0, 2**53)
contexts = st.builds(
    CallContext,
    text,
    st.sampled_from(["", "allow", "allow_downgraded"]),
    text,
    text,
    text,
    text,
    text,
    st.booleans(),
    count,
    st.lists(st.tuples(text, st.integers(0, 32_768)), max_size=3).map(tuple),
)
anomalies = st.builds(
    SettleAnomaly, st.sampled_from(list(AnomalyKind)), text, text, count, count, count, count
)
events = st.builds(
    JournalEvent,
    text,
    text,
    text,
    count,
    text,
    st.booleans(),
    count,
    count,
    count,
    count,
    count,
    contexts,
    st.lists(anomalies, max_size=3).map(tuple),
)


def reference(event: JournalEvent) -> str:
    """The stored form as it was first written, with asdict."""
    raw = asdict(event)
    raw["context"] = {k: v for k, v in raw["context"].items() if v not in ("", 0, False, ())}
    if not raw["anomalies"]:
        del raw["anomalies"]
    return json.dumps(raw, separators=(",", ":"), ensure_ascii=False)


@given(events)
def test_the_stored_form_is_unchanged_and_reads_back(event: JournalEvent) -> None:
    """Any event: the same text as the asdict-based form (stored events stay readable both ways),
    and parsing it gives the event back."""
    assert event.to_json() == reference(event)
    assert JournalEvent.from_json(event.to_json()) == event
