"""The webhook sink: every violation POSTed as JSON, signed with HMAC-SHA256, retried with backoff.

It reads the violations feed through a consumer group of its own (``webhook``), so
it runs beside the evaluator without ever slowing it down, delivers what was
stored while it was down, and hands a dead worker's undelivered violations to
another worker. Delivery is at least once and in feed order per tenant; each
POST carries the violation id in ``X-Spendgate-Delivery`` for receivers to
deduplicate.

Signature (Stripe-style, so a receiver can refuse replays)::

    X-Spendgate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>

:func:`verify_signature` is the receiver's check.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.client
import json
import random
import time
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import structlog

from spendgate_server.errors import StoreUnavailable
from spendgate_server.logging import Outage
from spendgate_server.policy.violations import VIOLATIONS_LOG, WEBHOOK_GROUP, Violation
from spendgate_server.store.logs import LogEntry, LogStore

__all__ = [
    "SIGNATURE_HEADER",
    "WebhookBackoff",
    "WebhookSink",
    "sign_payload",
    "verify_signature",
]

_log = structlog.get_logger("spendgate.webhook")
SIGNATURE_HEADER = "X-Spendgate-Signature"
DELIVERY_HEADER = "X-Spendgate-Delivery"
Post = Callable[[str, bytes, Mapping[str, str], float], Awaitable[int]]
Sleep = Callable[[float], Awaitable[None]]


def sign_payload(secret: bytes, timestamp: int, body: bytes) -> str:
    """The signature header value of ``body`` sent at ``timestamp`` (Unix seconds)."""
    digest = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(secret: bytes, header: str, body: bytes, now: int, tolerance_seconds: int = 300) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` and is at most ``tolerance_seconds`` old."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    expected = sign_payload(secret, timestamp, body).split("v1=", 1)[1]
    return abs(now - timestamp) <= tolerance_seconds and hmac.compare_digest(expected, fields.get("v1", ""))


async def urllib_post(url: str, body: bytes, headers: Mapping[str, str], timeout_seconds: float) -> int:
    """POST with the standard library (on a thread: it blocks); the HTTP status, raised for non-2xx."""

    def post() -> int:
        # The URL is the operator's --webhook-url, checked to be http(s) at start-up.
        request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")  # noqa: S310
        with urllib.request.urlopen(request, timeout=timeout_seconds) as response:  # noqa: S310
            return int(response.status)

    return await asyncio.to_thread(post)


@dataclass(frozen=True, slots=True)
class WebhookBackoff:
    """Delay before retry n (from 0): ``first_seconds * 2**n``, capped, with ±20% jitter."""

    first_seconds: float = 0.5
    max_seconds: float = 60.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt``."""
        base = min(self.first_seconds * 2.0**attempt, self.max_seconds)
        jitter: float = random.uniform(0.8, 1.2)
        return base * jitter


class WebhookSink:
    """Delivers every tenant's violations to one URL.

    Args:
        logs: the log store holding the violations feed.
        url: http(s) URL receiving POSTs.
        secret: the HMAC key shared with the receiver.
        consumer: this worker's name in the ``webhook`` consumer group.
        timeout_seconds: per POST.
        backoff: delays between attempts at one violation (retried until delivered).
        claim_idle_ms: a violation pending this long belongs to a dead worker.
        post: the HTTP client (the standard library's by default).
        sleep: how to wait between attempts (injected in tests).
        clock: Unix seconds, for the signature timestamp.
    """

    def __init__(
        self,
        logs: LogStore,
        url: str,
        secret: bytes,
        *,
        consumer: str,
        timeout_seconds: float = 5.0,
        backoff: WebhookBackoff | None = None,
        claim_idle_ms: int = 60_000,
        batch_size: int = 50,
        idle_poll_seconds: float = 0.2,
        post: Post = urllib_post,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], int] = lambda: int(time.time()),
    ) -> None:
        self._logs = logs
        self._url = url
        self._secret = secret
        self._consumer = consumer
        self._timeout = timeout_seconds
        self._backoff = backoff or WebhookBackoff()
        self._claim_idle_ms = claim_idle_ms
        self._batch_size = batch_size
        self._idle_poll = idle_poll_seconds
        self._post = post
        self._sleep = sleep
        self._clock = clock
        self._stopping = False
        self.delivered = 0
        self.failed_attempts = 0

    def stop(self) -> None:
        """Stop after the delivery in progress (its violation stays pending for a retry)."""
        self._stopping = True

    async def run_once(self) -> int:
        """Deliver what is waiting for every tenant; returns how many violations were delivered."""
        delivered = 0
        for tenant in await self._logs.tenants(VIOLATIONS_LOG):
            now_ms = self._clock() * 1000
            stale = await self._logs.claim(
                VIOLATIONS_LOG,
                tenant,
                WEBHOOK_GROUP,
                self._consumer,
                self._claim_idle_ms,
                self._batch_size,
                now_ms,
            )
            fresh = await self._logs.read_group(
                VIOLATIONS_LOG, tenant, WEBHOOK_GROUP, self._consumer, self._batch_size, now_ms
            )
            for entry in [*stale, *fresh]:
                if not await self._deliver(tenant, entry):
                    return delivered
                await self._logs.ack(VIOLATIONS_LOG, tenant, WEBHOOK_GROUP, [entry.entry_id])
                delivered += 1
        return delivered

    async def _deliver(self, tenant: str, entry: LogEntry) -> bool:
        """POST one violation until it is accepted (True) or the sink stops (False)."""
        try:
            violation = Violation.from_json(entry.payload, entry.entry_id)
        except (ValueError, KeyError, TypeError):
            _log.exception("webhook_violation_unreadable", tenant=tenant, entry_id=entry.entry_id)
            return True  # acknowledged: an unreadable entry would block the feed forever
        body = json.dumps(violation.webhook_payload(tenant), separators=(",", ":"), sort_keys=True).encode()
        attempt = 0
        while not self._stopping:
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "spendgate-webhook/1",
                SIGNATURE_HEADER: sign_payload(self._secret, self._clock(), body),
                DELIVERY_HEADER: violation.violation_id,
            }
            try:
                await self._post(self._url, body, headers, self._timeout)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                self.failed_attempts += 1
                delay = self._backoff.delay(attempt)
                _log.warning(
                    "webhook_delivery_failed",
                    violation_id=violation.violation_id,
                    attempt=attempt + 1,
                    error=str(exc),
                    retry_seconds=round(delay, 3),
                )
                attempt += 1
                await self._sleep(delay)
                continue
            self.delivered += 1
            return True
        return False

    async def run(self) -> None:
        """Deliver until :meth:`stop` or cancellation; store outages are logged and retried."""
        outage = Outage(_log, "webhook_round_failed", "webhook_round_restored")
        while not self._stopping:
            try:
                done = await self.run_once()
                outage.succeeded()
            except StoreUnavailable as exc:
                # An outage passes; anything else ends the process running the sink (lifecycle.py).
                outage.failed(exc)
                done = 0
            if not done and not self._stopping:
                await asyncio.sleep(self._idle_poll)
