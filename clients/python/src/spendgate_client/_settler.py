"""Settle calls in the background: off the caller's critical path, retried, flushed at exit.

One daemon thread per wrapper drains a queue of settle jobs through the blocking
DecisionClient. A job the service could not take (outage) is retried with
exponential backoff until :data:`MAX_RETRY_SECONDS` have passed; ``flush()``,
``close()`` and interpreter exit (atexit) drain the queue without waiting out
the backoff. A job that still cannot be sent is logged: its reservation then
expires on the server and counts at its estimate, which errs on the side of
the budget.

The async wrappers use the same thread: a settle must not be lost when the event
loop that made the call has already closed (``asyncio.run`` returning).
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field

from spendgate_client._client import DecisionClient, JournalContext, Usage
from spendgate_client._errors import SpendgateError
from spendgate_client._policy import CallJournal
from spendgate_client._usage import Reading

__all__ = ["EXIT_FLUSH_SECONDS", "MAX_RETRY_SECONDS", "SettleJob", "Settler"]

_log = logging.getLogger("spendgate_client")

# Keep retrying an unreachable service this long; reservations outlive it on the server.
MAX_RETRY_SECONDS = 600.0
# Backoff between rounds of DecisionClient.settle (which itself tries 3 times).
_FIRST_BACKOFF_SECONDS = 0.5
_MAX_BACKOFF_SECONDS = 30.0
# While flushing, a failed round is retried after this instead of the full backoff.
_FLUSH_BACKOFF_SECONDS = 0.1
EXIT_FLUSH_SECONDS = 5.0


@dataclass(order=True, slots=True)
class SettleJob:
    """One Settle to send. Ordered by when it may next be tried."""

    not_before: float
    sequence: int
    session_id: str = field(compare=False)
    reservation_id: str = field(compare=False)
    model: str = field(compare=False)
    usage: Usage | Reading = field(default_factory=Usage, compare=False)
    provider_ok: bool = field(default=True, compare=False)
    journal: CallJournal | None = field(default=None, compare=False)
    first_tried: float = field(default=0.0, compare=False)
    last_tried: float = field(default=0.0, compare=False)
    rounds: int = field(default=0, compare=False)


_live: weakref.WeakSet[Settler] = weakref.WeakSet()
_live_lock = threading.Lock()
_atexit_registered = False


def _flush_all_at_exit() -> None:
    with _live_lock:
        settlers = list(_live)
    for settler in settlers:
        settler.close(EXIT_FLUSH_SECONDS)


class Settler:
    """A background queue of settle jobs sent through ``client``.

    Args:
        client: the blocking client that sends Settle (thread-safe, so it may be shared).
        owns_client: close ``client`` when this settler closes.
    """

    def __init__(self, client: DecisionClient, *, owns_client: bool = False) -> None:
        global _atexit_registered
        self._client = client
        self._owns_client = owns_client
        self._cond = threading.Condition()
        self._heap: list[SettleJob] = []
        self._unfinished = 0
        self._hurry = 0  # flush() calls in progress: skip the backoff
        self._closed = False
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._sequence = itertools.count()
        self.settled = 0
        self.dropped = 0
        with _live_lock:
            _live.add(self)
            if not _atexit_registered:
                atexit.register(_flush_all_at_exit)
                _atexit_registered = True

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet settled or dropped."""
        with self._cond:
            return self._unfinished

    def submit(
        self,
        session_id: str,
        reservation_id: str,
        model: str,
        usage: Usage | Reading | None = None,
        *,
        provider_ok: bool = True,
        journal: CallJournal | None = None,
    ) -> None:
        """Queue a Settle; returns at once. After ``close()`` it is sent inline instead.

        ``usage`` may be a :class:`Reading`, read here on the settle thread (once).
        ``journal`` adds the call's journal context (and matches its prompt against the
        banned patterns) when the job is sent, on the settle thread.
        """
        now = time.monotonic()
        job = SettleJob(
            now,
            next(self._sequence),
            session_id,
            reservation_id,
            model,
            usage or Usage(),
            provider_ok,
            journal,
            now,
        )
        with self._cond:
            if not self._closed:
                heapq.heappush(self._heap, job)
                self._unfinished += 1
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="spendgate-settler", daemon=True)
                    self._thread.start()
                self._cond.notify_all()
                return
        # A stream finished after its client closed: still settle, on this thread.
        if self._send(job) is None:
            self._log_lost(1)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued job is settled or dropped. True if the queue drained in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._hurry += 1
            self._cond.notify_all()
            try:
                while self._unfinished:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._cond.wait(remaining)
                return True
            finally:
                self._hurry -= 1

    def close(self, timeout: float = EXIT_FLUSH_SECONDS) -> None:
        """Drain the queue for at most ``timeout`` seconds, then stop the thread. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._deadline = time.monotonic() + timeout
            thread = self._thread
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout + 1.0)
        with _live_lock:
            _live.discard(self)
        if self._owns_client:
            self._client.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                job = self._next_job()
                if job is None:
                    return
            result = self._send(job)
            with self._cond:
                now = time.monotonic()
                if (
                    result is None
                    and now - job.first_tried < MAX_RETRY_SECONDS
                    and not self._past_deadline(now)
                ):
                    job.rounds += 1
                    job.last_tried = now
                    backoff = min(_FIRST_BACKOFF_SECONDS * 2 ** (job.rounds - 1), _MAX_BACKOFF_SECONDS)
                    job.not_before = now + backoff
                    heapq.heappush(self._heap, job)
                else:
                    if result is None:
                        self._log_lost(1)
                    self._unfinished -= 1
                    self._cond.notify_all()

    def _past_deadline(self, now: float) -> bool:
        return self._deadline is not None and now >= self._deadline

    def _next_job(self) -> SettleJob | None:
        """Pop the next job that may be tried now; None when closed and done. Holds the lock."""
        while True:
            now = time.monotonic()
            if self._closed and (not self._heap or self._past_deadline(now)):
                if self._heap:
                    self._log_lost(len(self._heap))
                    self._unfinished -= len(self._heap)
                    self._heap.clear()
                    self._cond.notify_all()
                return None
            if self._heap:
                job = self._heap[0]
                ready = job.not_before
                if self._hurry or self._closed:
                    ready = min(ready, job.last_tried + _FLUSH_BACKOFF_SECONDS)
                wait = ready - now
                if wait <= 0:
                    return heapq.heappop(self._heap)
                if self._deadline is not None:
                    wait = min(wait, max(0.0, self._deadline - now))
                self._cond.wait(wait)
            else:
                self._cond.wait()

    def _send(self, job: SettleJob) -> bool | None:
        """True when settled, False when dropped for good, None to retry later."""
        if isinstance(job.usage, Reading):
            try:
                usage = job.usage.resolve()
            except Exception:
                usage = None
                _log.exception("spendgate: reading the usage of %s failed", job.reservation_id)
            if usage is None:
                # Nothing billed could be read: the reservation expires at its estimate (errs high).
                _log.info(
                    "spendgate: no usage in the answer of %s; it counts at its estimate", job.reservation_id
                )
                return True
            job.usage = usage
        context: JournalContext | None = None
        if job.journal is not None:
            try:
                context = job.journal.context()
            except Exception:
                # The journal context is best effort: the settle itself must still go out.
                _log.exception("spendgate: journal context of %s failed; settled without", job.reservation_id)
        try:
            settlement = self._client.settle(
                job.session_id,
                job.reservation_id,
                job.model,
                job.usage,
                provider_ok=job.provider_ok,
                journal=context,
            )
        except SpendgateError as error:
            # Not an outage: the service refused it (unknown or expired reservation).
            self.dropped += 1
            _log.warning("spendgate refused settle of %s: %s", job.reservation_id, error)
            return False
        except Exception:
            self.dropped += 1
            _log.exception("spendgate settle of %s failed", job.reservation_id)
            return False
        if settlement is None:
            return None
        self.settled += 1
        return True

    def _log_lost(self, count: int) -> None:
        self.dropped += count
        _log.warning(
            "spendgate: %d settle(s) could not be sent; those reservations will count at their "
            "estimate when they expire",
            count,
        )
