"""Settle calls in the background: off the caller's critical path, retried, flushed at exit.

One daemon thread per wrapper drains a queue of settle jobs through the blocking
DecisionClient. It first *prepares* a job (reads the usage from the answer, builds the
journal context and the SettleRequest), then the job goes out one of two ways:

* **carried by the next Decide** of its session (DecisionClient.carry_settles): a
  prepared job waits up to :attr:`Settler.carry_seconds` for a Decide to take it, so
  one RPC (and one Redis write on the server) does the work of two;
* **in a batch**: jobs whose wait is over, and every job while flushing or closing,
  leave together in one SettleBatch (up to :data:`MAX_BATCH_SETTLES`, under
  :data:`MAX_BATCH_BYTES`); a lone job is a plain Settle.

A job the service could not take (outage; or a Decide that carried it failed) is
retried with exponential backoff until :data:`MAX_RETRY_SECONDS` have passed;
settling is idempotent, so a job sent twice counts once. Nothing is dropped but what
the service refuses for good (an unknown reservation, bad input) and what is still
queued when ``close()`` runs out of time. ``flush()``, ``close()`` and interpreter exit
(atexit) drain the queue without waiting out the backoff or the carry wait. A job
that still cannot be sent is logged: its reservation then expires on the server and
counts at its estimate, which errs on the side of the budget.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from spendgate.v1 import decision_pb2 as pb

from spendgate_client._client import (
    DecisionClient,
    JournalContext,
    Usage,
    _settle_request,
    settle_refused,
)
from spendgate_client._errors import SpendgateError
from spendgate_client._policy import CallJournal
from spendgate_client._usage import Reading

__all__ = [
    "CARRY_SECONDS",
    "EXIT_FLUSH_SECONDS",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_SETTLES",
    "MAX_CARRIED_SETTLES",
    "MAX_RETRY_SECONDS",
    "SettleJob",
    "Settler",
]

_log = logging.getLogger("spendgate_client")

# Keep retrying an unreachable service this long; reservations outlive it on the server.
MAX_RETRY_SECONDS = 600.0
# Backoff between rounds of DecisionClient.settle (which itself tries 3 times).
_FIRST_BACKOFF_SECONDS = 0.5
_MAX_BACKOFF_SECONDS = 30.0
# While flushing, a failed round is retried after this instead of the full backoff.
_FLUSH_BACKOFF_SECONDS = 0.1
EXIT_FLUSH_SECONDS = 5.0
# How long a prepared settle waits for a Decide of its session to carry it. Short: the
# reservation holds the call's worst case meanwhile (which errs on the side of the budget).
CARRY_SECONDS = 0.05
# The server's bounds: 64 settles per batch, 64 KiB per message (a settle may carry 32 KiB
# of prompt); a Decide carries few, so that its own latency stays close to a lone Decide's.
MAX_BATCH_SETTLES = 64
MAX_BATCH_BYTES = 48 * 1024
MAX_CARRIED_SETTLES = 8
_MAX_CARRIED_BYTES = 16 * 1024


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
    # Set once prepared (usage read, journal context built); None before.
    request: pb.SettleRequest | None = field(default=None, compare=False)
    context: JournalContext | None = field(default=None, compare=False)
    size: int = field(default=0, compare=False)


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
        carry: let ``client``'s Decides carry prepared settles (see the module docstring);
            :meth:`carrier` is what an AsyncDecisionClient of the same session is given.

    Attributes:
        carry_seconds: how long a prepared settle waits for a Decide to carry it; 0 sends
            every settle on this thread.
        max_batch: settles per SettleBatch; 1 sends each as a plain Settle.
        settled: settles applied (or found applied before).
        dropped: settles refused for good or given up on.
        carried: settles that went out with a Decide and were applied.
    """

    def __init__(self, client: DecisionClient, *, owns_client: bool = False, carry: bool = True) -> None:
        global _atexit_registered
        self._client = client
        self._owns_client = owns_client
        self._cond = threading.Condition()
        self._heap: list[SettleJob] = []
        self._unfinished = 0
        self._in_decides = 0  # jobs out with a Decide right now
        self._hurry = 0  # flush() calls in progress: skip the backoff and the carry wait
        self._closed = False
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._sequence = itertools.count()
        self._batches = True  # False once the server answered UNIMPLEMENTED to SettleBatch
        self.carry_seconds = CARRY_SECONDS if carry else 0.0
        self.max_batch = MAX_BATCH_SETTLES
        self.settled = 0
        self.dropped = 0
        self.carried = 0
        if carry:
            client.carry_settles(self.carrier)
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
        banned patterns) when the job is prepared, on the settle thread.
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
        if not self._prepare(job):
            return
        if self._send_one(job) is None:
            self._log_lost(1)

    def carrier(
        self, session_id: str
    ) -> tuple[Sequence[pb.SettleRequest], Callable[[Sequence[pb.SettleResult] | None], None]] | None:
        """The prepared settles of ``session_id`` a Decide about to be sent may carry (see
        :data:`spendgate_client._client.SettleCarrier`), or None when there are none."""
        with self._cond:
            if self._closed or not self.carry_seconds or not self._heap:
                return None
            taken: list[SettleJob] = []
            size = 0
            for job in self._heap:
                if job.request is None or job.session_id != session_id:
                    continue
                if taken and size + job.size > _MAX_CARRIED_BYTES:
                    break
                taken.append(job)
                size += job.size
                if len(taken) == MAX_CARRIED_SETTLES:
                    break
            if not taken:
                return None
            ids = {id(job) for job in taken}
            self._heap = [job for job in self._heap if id(job) not in ids]
            heapq.heapify(self._heap)
            self._in_decides += len(taken)
        return [job.request for job in taken if job.request is not None], lambda results: self._carried(
            taken, results
        )

    def _carried(self, jobs: list[SettleJob], results: Sequence[pb.SettleResult] | None) -> None:
        """What became of settles a Decide carried; those not known applied go back in the queue."""
        if results is not None and len(results) != len(jobs):
            # A server that predates carried settles ignored them: stop asking it to.
            results = None
            self.carry_seconds = 0.0
        with self._cond:
            self._in_decides -= len(jobs)
            now = time.monotonic()
            for i, job in enumerate(jobs):
                if results is not None:
                    self._finish(job, self._outcome(job, results[i]), now)
                    self.carried += results[i].code == 0
                elif self._closed and self._past_deadline(now):
                    self._log_lost(1)  # the thread has given up waiting for them
                    self._unfinished -= 1
                else:
                    # Nothing is known of it: this thread sends it now (it is idempotent).
                    job.not_before = job.last_tried = 0.0
                    heapq.heappush(self._heap, job)
            self._cond.notify_all()

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
        if self._client._carrier == self.carrier:
            self._client.carry_settles(None)
        if self._owns_client:
            self._client.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                jobs = self._next_jobs()
                if jobs is None:
                    return
            ready = [job for job in jobs if job.request is not None]
            fresh = [job for job in jobs if job.request is None]
            parked: list[SettleJob] = []
            for job in fresh:
                if not self._prepare(job):
                    with self._cond:
                        self._unfinished -= 1
                        self._cond.notify_all()
                    continue
                if self.carry_seconds and not (self._hurry or self._closed):
                    parked.append(job)
                else:
                    ready.append(job)
            if parked:
                with self._cond:
                    wake = time.monotonic() + self.carry_seconds
                    for job in parked:
                        job.not_before = wake
                        heapq.heappush(self._heap, job)
            if ready:
                self._send(ready)

    def _send(self, jobs: list[SettleJob]) -> None:
        """Send ``jobs`` (prepared) as one batch, or one by one; record what became of each."""
        outcomes: list[bool | None]
        if len(jobs) == 1 or not self._batches or self.max_batch <= 1:
            outcomes = [self._send_one(job) for job in jobs]
        else:
            outcomes = self._send_batch(jobs)
        with self._cond:
            now = time.monotonic()
            for job, outcome in zip(jobs, outcomes, strict=True):
                self._finish(job, outcome, now)
            self._cond.notify_all()

    def _send_batch(self, jobs: list[SettleJob]) -> list[bool | None]:
        requests = [job.request for job in jobs if job.request is not None]
        try:
            results = self._client.settle_batch(requests)
        except NotImplementedError:
            self._batches = False
            return [self._send_one(job) for job in jobs]
        except SpendgateError as error:
            # The batch itself was refused (not an outage): each may still go alone.
            _log.warning("spendgate refused a batch of %d settles (%s); sending each alone", len(jobs), error)
            return [self._send_one(job) for job in jobs]
        if results is None:
            return [None] * len(jobs)
        return [self._outcome(job, result) for job, result in zip(jobs, results, strict=True)]

    def _outcome(self, job: SettleJob, result: pb.SettleResult) -> bool | None:
        """True when applied, False when refused for good, None to retry later."""
        if result.code == 0:
            self.settled += 1
            return True
        if settle_refused(result):
            self.dropped += 1
            _log.warning("spendgate refused settle of %s: %s", job.reservation_id, result.message)
            return False
        return None

    def _finish(self, job: SettleJob, outcome: bool | None, now: float) -> None:
        """Count a job done, or queue it again after its backoff. Holds the lock."""
        if outcome is None and now - job.first_tried < MAX_RETRY_SECONDS and not self._past_deadline(now):
            job.rounds += 1
            job.last_tried = now
            backoff = min(_FIRST_BACKOFF_SECONDS * 2 ** (job.rounds - 1), _MAX_BACKOFF_SECONDS)
            job.not_before = now + backoff
            heapq.heappush(self._heap, job)
            return
        if outcome is None:
            self._log_lost(1)
        self._unfinished -= 1

    def _past_deadline(self, now: float) -> bool:
        return self._deadline is not None and now >= self._deadline

    def _ready_at(self, job: SettleJob) -> float:
        ready = job.not_before
        if self._hurry or self._closed:
            ready = min(ready, job.last_tried + _FLUSH_BACKOFF_SECONDS)
        return ready

    def _next_jobs(self) -> list[SettleJob] | None:
        """Pop the jobs that may be tried now (one batch); None when closed and done. Holds the lock."""
        while True:
            now = time.monotonic()
            if self._closed and (self._past_deadline(now) or not (self._heap or self._in_decides)):
                if self._heap:
                    self._log_lost(len(self._heap))
                    self._unfinished -= len(self._heap)
                    self._heap.clear()
                    self._cond.notify_all()
                if not self._in_decides or self._past_deadline(now):
                    return None
            if self._heap:
                wait = self._ready_at(self._heap[0]) - now
                if wait <= 0:
                    return self._pop_batch(now)
                if self._deadline is not None:
                    wait = min(wait, max(0.0, self._deadline - now))
                self._cond.wait(wait)
            else:
                self._cond.wait(
                    None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
                )

    def _pop_batch(self, now: float) -> list[SettleJob]:
        """The first ready job and every other ready one that fits a batch with it. Holds the lock.

        A job not yet prepared is popped alone when nothing prepared is ready: preparing
        comes first, its sending later.
        """
        jobs = [heapq.heappop(self._heap)]
        size = jobs[0].size
        # Ready jobs are at the front of the heap in not_before order; while flushing a job
        # may be ready although a later one in the heap is not, which only ends the batch early.
        while self._heap and len(jobs) < self.max_batch and self._ready_at(self._heap[0]) <= now:
            if size + self._heap[0].size > MAX_BATCH_BYTES:
                break
            job = heapq.heappop(self._heap)
            size += job.size
            jobs.append(job)
        return jobs

    def _prepare(self, job: SettleJob) -> bool:
        """Read the usage and build the SettleRequest; False when there is nothing to settle."""
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
                return False
            job.usage = usage
        context: JournalContext | None = None
        if job.journal is not None:
            try:
                context = job.journal.context()
            except Exception:
                # The journal context is best effort: the settle itself must still go out.
                _log.exception("spendgate: journal context of %s failed; settled without", job.reservation_id)
        job.context = context
        job.request = _settle_request(
            job.session_id, job.reservation_id, job.model, job.usage, job.provider_ok, context, {}
        )
        job.size = job.request.ByteSize()
        return True

    def _send_one(self, job: SettleJob) -> bool | None:
        """Send one prepared job as a plain Settle: True when settled, False when dropped for
        good, None to retry later."""
        assert isinstance(job.usage, Usage)
        try:
            settlement = self._client.settle(
                job.session_id,
                job.reservation_id,
                job.model,
                job.usage,
                provider_ok=job.provider_ok,
                journal=job.context,
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
