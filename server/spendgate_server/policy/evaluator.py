"""The evaluator: a consumer group over every tenant's journal that stores policy violations.

At-least-once, and no duplicates: a batch is acknowledged only after its
violations are stored, so a worker that dies mid-batch leaves its entries
pending; another worker (or this one, restarted) claims entries pending longer
than ``claim_idle_ms`` and evaluates them again. A violation's id is derived from
(call, policy), and the feed stores an id once, so the second evaluation adds
nothing that the first already stored.

Where it runs:

- ``spendgate worker`` (any number, against Redis), a process of its own;
- ``spendgate serve --store redis``: the same worker, as one child process of the server
  at :data:`EVALUATION_NICENESS` with its own Redis connections (worker.py
  ``run_evaluation_child``, alerts.py, lifecycle.ChildProcess). The serving event loop
  then reads, claims, acknowledges and stores nothing: that work grows with the settle
  rate (one journal entry per settle), and it measured about 7% of a saturated serving
  loop. The child evaluates inline (:class:`InlineEvaluation`): it is itself the
  low-priority process;
- ``spendgate serve`` on the memory store: inside the server, on its event loop,
  because the embedded journal lives in the server's memory and no other process can
  read it. Only the matching leaves that loop, see below.

Matching never runs on an event loop that answers Decide: one tenant's patterns over
32 KiB prompts must not make another tenant miss its deadline. Where the evaluator
shares the server's loop (the memory store), that loop only moves entries; the
policies are applied by :class:`ProcessEvaluation`, one child process at a lower
scheduling priority. (google-re2 does release the GIL while it scans, measured, but
the redaction and JSON work around it does not, and a thread cannot be given a lower
priority portably; a process also bounds the memory of compiled patterns apart from
the server's.) The work per entry is bounded where policies are written
(policies.py: patterns, RE2 program size, bytes scanned).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from spendgate_server.errors import StoreUnavailable
from spendgate_server.logging import Outage
from spendgate_server.metrics import Metrics
from spendgate_server.policy.checks import evaluate
from spendgate_server.policy.journal import EVALUATOR_GROUP, JOURNAL_LOG, JournalEvent
from spendgate_server.policy.policies import CompiledPolicies, Policies, compile_policies
from spendgate_server.policy.remote_policies import PolicyResolver
from spendgate_server.policy.violations import Violation, ViolationFeed
from spendgate_server.store.logs import LogEntry, LogStore

__all__ = [
    "EVALUATION_NICENESS",
    "BatchResult",
    "Evaluation",
    "Evaluator",
    "EvaluatorTimings",
    "InlineEvaluation",
    "ProcessEvaluation",
    "default_consumer_name",
    "evaluate_batch",
]

_log = structlog.get_logger("spendgate.evaluator")
Clock = Callable[[], int]


def default_consumer_name() -> str:
    """``host:pid``: unique per worker process, readable in XINFO CONSUMERS."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _system_ms() -> int:
    return time.time_ns() // 1_000_000


# The evaluation process runs this much nicer than the server: on a busy machine the
# scheduler gives Decide the CPU first and the evaluator what is left (it only lags).
EVALUATION_NICENESS = 10
# Compiled policy sets the evaluation process keeps (tenant policies at a version).
_COMPILED_CACHE_SIZE = 64


@dataclass(frozen=True, slots=True)
class BatchResult:
    """The violations a batch of journal entries produced, and the entries that failed.

    ``failures`` holds (index into the batch, error text): a poison entry is reported
    and acknowledged, because retrying it forever would stall the tenant.
    """

    violations: list[Violation] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)


def evaluate_batch(policies: CompiledPolicies, payloads: Sequence[str]) -> BatchResult:
    """Apply ``policies`` to each journal entry payload (JournalEvent JSON): CPU work, no I/O."""
    result = BatchResult()
    for index, payload in enumerate(payloads):
        try:
            result.violations.extend(evaluate(JournalEvent.from_json(payload), policies))
        except Exception as exc:
            result.failures.append((index, f"{type(exc).__name__}: {exc}"))
    return result


class Evaluation(Protocol):
    """Where :func:`evaluate_batch` runs."""

    async def evaluate(self, policies: CompiledPolicies, payloads: Sequence[str]) -> BatchResult:
        """The result of :func:`evaluate_batch` over ``payloads``."""

    async def close(self) -> None:
        """Release what it holds (a process)."""


class InlineEvaluation:
    """Evaluates on the calling event loop: for tests and tools, never beside a decision path."""

    async def evaluate(self, policies: CompiledPolicies, payloads: Sequence[str]) -> BatchResult:
        """The result of :func:`evaluate_batch`, computed here."""
        return evaluate_batch(policies, payloads)

    async def close(self) -> None:
        """Nothing to release."""


def _exit_with_parent() -> None:
    """End this process as soon as the process that spawned it has ended, even by SIGKILL.

    Its pool would otherwise wait for work for ever, an orphan holding its compiled
    patterns. The parent holds the writing end of a pipe (multiprocessing's parent
    sentinel) that the kernel closes when it ends.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        # Nothing to finish: a batch in progress stays pending and is evaluated again.
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _start_evaluation_process(niceness: int) -> None:
    # The parent decides when to stop; a terminal's Ctrl-C goes to the whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()
    # A platform that refuses nice() still evaluates, at the server's priority.
    with contextlib.suppress(OSError):
        os.nice(niceness)


@functools.lru_cache(maxsize=_COMPILED_CACHE_SIZE)
def _compiled(policies: Policies, version: int) -> CompiledPolicies:
    return compile_policies(policies, version)


def _evaluate_in_child(policies: Policies, version: int, payloads: list[str]) -> BatchResult:
    return evaluate_batch(_compiled(policies, version), payloads)


class ProcessEvaluation:
    """Evaluates in one child process (spawned on first use, replaced if it dies).

    The child runs ``niceness`` steps nicer than this process, compiles each tenant's
    patterns once per policy version, and ends by itself when this process ends (even
    by SIGKILL). Only the policies (uncompiled) and the
    entries' payloads cross the pipe; the pickling and the wait happen off the loop.

    Args:
        niceness: added to the child's scheduling niceness (Unix).
        evaluate: the function the child runs (``_evaluate_in_child``); replaceable so a
            test can prove the loop stays free while the child works.
    """

    def __init__(
        self,
        niceness: int = EVALUATION_NICENESS,
        evaluate: Callable[[Policies, int, list[str]], BatchResult] = _evaluate_in_child,
    ) -> None:
        self._niceness = niceness
        self._evaluate = evaluate
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=1,
                # spawn, not fork: the server's gRPC threads must not be forked.
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_evaluation_process,
                initargs=(self._niceness,),
            )
        return self._pool

    async def evaluate(self, policies: CompiledPolicies, payloads: Sequence[str]) -> BatchResult:
        """The result of :func:`evaluate_batch`, computed in the child process.

        Raises:
            BrokenProcessPool: the child died (it is replaced on the next call; the
                batch stays pending and is evaluated again).
        """
        loop = asyncio.get_running_loop()
        pool = self._executor()
        try:
            return await loop.run_in_executor(
                pool, self._evaluate, policies.policies, policies.version, list(payloads)
            )
        except BrokenProcessPool:
            _log.error("evaluation_process_died", action="replaced on the next batch")
            self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise

    async def close(self) -> None:
        """Stop the child (after the batch it is on, if any)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)


@dataclass(frozen=True, slots=True)
class EvaluatorTimings:
    """How the evaluator paces itself."""

    # Entries read per tenant per round.
    batch_size: int = 100
    # An entry pending this long belongs to a dead consumer and may be claimed.
    claim_idle_ms: int = 30_000
    # Pause between rounds that found nothing.
    idle_poll_seconds: float = 0.2
    # How often the lag and pending gauges are refreshed.
    metrics_interval_seconds: float = 5.0


class Evaluator:
    """Evaluates journal entries into violations for every tenant.

    Args:
        logs: the log store holding the journals.
        feed: where violations go.
        policies: the tenants' current policies.
        consumer: this worker's name in the consumer group.
        timings: batch size, claim idle bound, poll and metrics intervals.
        metrics: sets spendgate_journal_lag_seconds and spendgate_evaluator_pending.
        clock: Unix milliseconds.
        evaluation: where the policies are applied (default: a child process, see
            :class:`ProcessEvaluation`); closed when :meth:`run` returns.
        gauges: also given (pending entries, lag in seconds) at each refresh: an evaluator
            in a child of ``spendgate serve`` sends them to the server, which exports them.
    """

    def __init__(
        self,
        logs: LogStore,
        feed: ViolationFeed,
        policies: PolicyResolver,
        *,
        consumer: str | None = None,
        timings: EvaluatorTimings | None = None,
        metrics: Metrics | None = None,
        clock: Clock = _system_ms,
        evaluation: Evaluation | None = None,
        gauges: Callable[[int, float], None] | None = None,
    ) -> None:
        self._logs = logs
        self._gauges = gauges
        self._evaluation: Evaluation = evaluation if evaluation is not None else ProcessEvaluation()
        self._feed = feed
        self._policies = policies
        self.consumer = consumer or default_consumer_name()
        self._timings = timings or EvaluatorTimings()
        self._metrics = metrics
        self._clock = clock
        self._stopping = False
        self.evaluated = 0

    async def run_once(self) -> int:
        """One round over every tenant: claim a dead consumer's entries, then read new ones.

        Returns:
            How many journal entries were evaluated (and acknowledged).
        """
        t = self._timings
        done = 0
        for tenant in await self._logs.tenants(JOURNAL_LOG):
            now = self._clock()
            stale = await self._logs.claim(
                JOURNAL_LOG, tenant, EVALUATOR_GROUP, self.consumer, t.claim_idle_ms, t.batch_size, now
            )
            if stale:
                _log.info("journal_entries_reclaimed", tenant=tenant, count=len(stale))
                done += await self._process(tenant, stale)
            fresh = await self._logs.read_group(
                JOURNAL_LOG, tenant, EVALUATOR_GROUP, self.consumer, t.batch_size, now
            )
            done += await self._process(tenant, fresh)
        return done

    async def _process(self, tenant: str, entries: list[LogEntry]) -> int:
        if not entries:
            return 0
        policies = await self._policies.get(tenant)
        result = await self._evaluation.evaluate(policies, [e.payload for e in entries])
        violations = result.violations
        for index, error in result.failures:
            # A poison entry is logged and acknowledged: retrying it forever would stall the tenant.
            _log.error(
                "journal_entry_not_evaluated", tenant=tenant, entry_id=entries[index].entry_id, error=error
            )
        # Stored first, acknowledged after: a crash in between re-evaluates, and the ids dedupe.
        added = await self._feed.add(tenant, violations, self._clock())
        await self._logs.ack(JOURNAL_LOG, tenant, EVALUATOR_GROUP, [e.entry_id for e in entries])
        self.evaluated += len(entries)
        if violations:
            _log.info(
                "violations_found", tenant=tenant, found=len(violations), stored=added, entries=len(entries)
            )
        return len(entries)

    async def refresh_metrics(self) -> tuple[int, float]:
        """Set the gauges; returns (pending entries, lag in seconds) over every tenant."""
        pending, oldest = 0, None
        for tenant in await self._logs.tenants(JOURNAL_LOG):
            pending += await self._logs.pending(JOURNAL_LOG, tenant, EVALUATOR_GROUP)
            first = await self._logs.oldest_unacked_ms(JOURNAL_LOG, tenant, EVALUATOR_GROUP)
            if first is not None:
                oldest = first if oldest is None else min(oldest, first)
        lag = max(0.0, (self._clock() - oldest) / 1000) if oldest is not None else 0.0
        if self._metrics is not None:
            self._metrics.evaluator_pending.set(pending)
            self._metrics.journal_lag.set(lag)
        if self._gauges is not None:
            self._gauges(pending, lag)
        return pending, lag

    def stop(self) -> None:
        """Finish the round in progress, then return from :meth:`run`."""
        self._stopping = True

    async def close(self) -> None:
        """Release the evaluation process (:meth:`run` does this when it returns)."""
        await self._evaluation.close()

    async def run(self) -> None:
        """Evaluate until :meth:`stop` (or cancellation); store outages are logged and retried,
        and so is a batch whose evaluation process died (it is replaced).

        Raises:
            Exception: anything else (a bug, a record it cannot read): the process running
                the evaluator ends with it rather than evaluating nothing unnoticed.
        """
        try:
            await self._run()
        finally:
            await self.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_metrics = 0.0
        failures = 0
        outage = Outage(_log, "evaluator_round_failed", "evaluator_round_restored")
        task = asyncio.current_task()
        while not self._stopping:
            if task is not None and task.cancelling():
                # A cancellation can be swallowed inside a Redis call (redis-py, asyncio.timeout);
                # looping on kept a server that failed a start-up check from ever exiting.
                raise asyncio.CancelledError
            try:
                done = await self.run_once()
                if loop.time() >= next_metrics:
                    await self.refresh_metrics()
                    next_metrics = loop.time() + self._timings.metrics_interval_seconds
                failures = 0
                outage.succeeded()
            except (StoreUnavailable, BrokenProcessPool) as exc:
                # An outage passes, and a dead evaluation process is replaced: back off, keep evaluating.
                failures += 1
                outage.failed(exc)
                await asyncio.sleep(min(self._timings.idle_poll_seconds * 2**failures, 5.0))
                continue
            if not done:
                await asyncio.sleep(self._timings.idle_poll_seconds)
