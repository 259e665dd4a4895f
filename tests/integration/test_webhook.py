"""The webhook sink against a real local HTTP receiver: signed, retried with backoff, never in the way."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from spendgate_server.policy.evaluator import Evaluator, EvaluatorTimings
from spendgate_server.policy.journal import CallContext, JournalEvent, StoreJournal
from spendgate_server.policy.remote_policies import PolicyResolver
from spendgate_server.policy.violations import (
    VIOLATIONS_LOG,
    WEBHOOK_GROUP,
    PolicyType,
    Violation,
    ViolationFeed,
)
from spendgate_server.policy.webhook import SIGNATURE_HEADER, WebhookSink, verify_signature
from spendgate_server.store.logs import LogStore, MemoryLogStore
from spendgate_server.store.policies import PolicyStore
from spendgate_server.store.redis_logs import RedisLogStore

from tests.conftest import STORES

SECRET = b"0123456789abcdef-webhook"
NOW_S = 1_800_000_000


@dataclass
class Receiver:
    """A local HTTP server that answers 500 to its first ``failures`` POSTs, then 204."""

    failures: int = 0
    received: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = 500 if receiver.failures > 0 else 204
                receiver.failures -= 1
                receiver.received.append((status, dict(self.headers), body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    @property
    def accepted(self) -> list[tuple[dict[str, str], bytes]]:
        return [(headers, body) for status, headers, body in self.received if status == 204]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    started = Receiver().start()
    yield started
    started.stop()


@pytest.fixture(params=STORES)
async def logs(request: pytest.FixtureRequest) -> AsyncIterator[LogStore]:
    if request.param == "memory":
        store: LogStore = MemoryLogStore()
    else:
        store = RedisLogStore.from_url(request.getfixturevalue("redis_url"), timeout_seconds=5)
    yield store
    await store.close()


def violation(n: int) -> Violation:
    return Violation(
        f"v{n}",
        PolicyType.APPROVED_MODELS,
        f"model m{n} ran",
        1,
        f"d{n}",
        "s",
        "p",
        "m",
        "m",
        "",
        "",
        "",
        0,
        1,
    )


class Delays:
    """An injected sleep: records each backoff and returns at once."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seen.append(seconds)
        await asyncio.sleep(0)


def sink(logs: LogStore, url: str, delays: Delays, secret: bytes = SECRET) -> WebhookSink:
    return WebhookSink(logs, url, secret, consumer="w", sleep=delays, clock=lambda: NOW_S, timeout_seconds=5)


async def test_signed_payloads_survive_a_receiver_that_fails_at_first(
    logs: LogStore, receiver: Receiver
) -> None:
    """Two 500s, then success: each violation is accepted once, in order, signed, after growing backoffs."""
    feed = ViolationFeed(logs, max_entries=100, dedup_window_ms=60_000)
    await feed.add("acme", [violation(n) for n in range(3)], 1)
    receiver.failures = 2
    delays = Delays()
    webhook = sink(logs, receiver.url, delays)
    assert await webhook.run_once() == 3
    assert len(receiver.received) == 5 and webhook.failed_attempts == 2
    assert len(delays.seen) == 2 and 0.4 <= delays.seen[0] < delays.seen[1] <= 1.2
    payloads = []
    for headers, body in receiver.accepted:
        assert verify_signature(SECRET, headers[SIGNATURE_HEADER], body, NOW_S)
        assert not verify_signature(b"another-secret-entirely", headers[SIGNATURE_HEADER], body, NOW_S)
        assert not verify_signature(SECRET, headers[SIGNATURE_HEADER], body, NOW_S + 3600)  # a replay
        payload = json.loads(body)
        assert headers["X-Spendgate-Delivery"] == payload["violation_id"]
        payloads.append(payload)
    assert [(p["tenant"], p["violation_id"], p["policy_type"]) for p in payloads] == [
        ("acme", f"v{n}", "approved_models") for n in range(3)
    ]
    assert all(p["cursor"] for p in payloads)
    # Delivered means acknowledged: nothing is sent twice.
    assert await webhook.run_once() == 0
    assert await logs.pending(VIOLATIONS_LOG, "acme", WEBHOOK_GROUP) == 0


async def test_a_dead_receiver_never_blocks_the_evaluator(logs: LogStore, receiver: Receiver) -> None:
    """While the webhook retries a failing receiver, the evaluator keeps storing violations."""
    receiver.failures = 10**9
    feed = ViolationFeed(logs, max_entries=100, dedup_window_ms=60_000)
    policies = PolicyResolver(PolicyStore())
    await policies.store.put("acme", json.dumps({"approved_models": ["ok"]}), "", "t", 1)
    journal = StoreJournal(logs, max_entries=100, journals_prompts=policies.journals_prompts)
    webhook = sink(logs, receiver.url, Delays())
    task = asyncio.create_task(webhook.run())
    evaluator = Evaluator(logs, feed, policies, consumer="e", timings=EvaluatorTimings(claim_idle_ms=0))
    try:
        for n in range(20):
            event = JournalEvent(f"{n:032x}", "acme", "s", 1, "bad", True, 1, 1, 0, 0, 1, CallContext())
            await journal.append(event, 60_000)
            assert await evaluator.run_once() == 1
            # Wait until the sink is stuck on the first violation (the receiver runs on its own thread).
            while n == 0 and not receiver.received:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
    finally:
        # Its evaluation child process ends with it (left open, it outlived the test run).
        await evaluator.close()
    assert len(await feed.after("acme", "0-0", 100)) == 20
    webhook.stop()
    await asyncio.wait_for(task, 10)
    assert webhook.delivered == 0 and webhook.failed_attempts >= 1
    # What was not delivered stays pending for the next worker.
    assert await logs.pending(VIOLATIONS_LOG, "acme", WEBHOOK_GROUP) >= 1
