"""Outage logging: a retrying loop logs an outage once when it starts and once when it ends."""

from __future__ import annotations

import logging
from typing import Any

import structlog
from hypothesis import given
from hypothesis import strategies as st
from spendgate_server.logging import Outage
from structlog.testing import LogCapture


def captured() -> tuple[Any, list[Any]]:
    """A logger at DEBUG whose events are recorded, whatever another test configured globally
    (a process-wide filtering level of INFO would drop the debug lines this file counts)."""
    capture = LogCapture()
    logger = structlog.wrap_logger(
        structlog.ReturnLogger(),
        processors=[capture],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    )
    return logger, capture.entries


class Clock:
    """Monotonic seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5000)), max_size=40))
def test_each_outage_is_one_start_and_one_end(tries: list[tuple[bool, int]]) -> None:
    """Any run of good and failed tries: one warning per outage, one info per outage ended, its length."""
    clock = Clock()
    log, logs = captured()
    outage = Outage(log, "thing_lost", "thing_restored", clock=clock, part="p")
    expected: list[tuple[str, str, float | None, int | None]] = []
    started = None
    failures = 0
    for ok, millis in tries:
        clock.now += millis / 1000
        if ok:
            outage.succeeded()
            if started is not None:
                expected.append(("info", "thing_restored", round(clock.now - started, 3), failures))
            started, failures = None, 0
        else:
            outage.failed(RuntimeError("down"))
            failures += 1
            if started is None:
                started = clock.now
                expected.append(("warning", "thing_lost", None, None))
            else:
                expected.append(("debug", "thing_lost", None, failures))
    seen = [(e["log_level"], e["event"], e.get("outage_seconds"), e.get("failures")) for e in logs]
    assert seen == expected
    assert all(e["part"] == "p" for e in logs)
    assert outage.down == (started is not None)


def test_an_hour_of_retries_is_two_lines_above_debug() -> None:
    """The issue's case: a loop retrying every 2 s for an hour logs one warning and one info."""
    clock = Clock()
    log, logs = captured()
    outage = Outage(log, "config_pubsub_lost", "config_pubsub_restored", clock=clock)
    for _ in range(1800):
        outage.failed(ConnectionError("Connection refused"), retry_seconds=2.0)
        clock.now += 2.0
    outage.succeeded()
    above_debug = [e for e in logs if e["log_level"] != "debug"]
    assert above_debug == [
        {
            "event": "config_pubsub_lost",
            "log_level": "warning",
            "error": "Connection refused",
            "retry_seconds": 2.0,
        },
        {"event": "config_pubsub_restored", "log_level": "info", "outage_seconds": 3600.0, "failures": 1800},
    ]
