"""Composition of the journal, policies and alerts pipeline, shared by ``serve`` and ``worker``.

the process's stores (stores.py: log store and policy store) → policy resolver →
journal (for the engine), violations feed (for the servicer), evaluator and
webhook sink (background tasks, or one child process: see :meth:`Alerts.start`).
"""

from __future__ import annotations

import asyncio
import multiprocessing.connection
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from spendgate_server.lifecycle import ChildProcess, run_part
from spendgate_server.metrics import Metrics
from spendgate_server.policy.evaluator import Evaluation, Evaluator, EvaluatorTimings, default_consumer_name
from spendgate_server.policy.journal import StoreJournal
from spendgate_server.policy.remote_policies import PolicyResolver
from spendgate_server.policy.violations import ViolationFeed
from spendgate_server.policy.webhook import WebhookSink
from spendgate_server.settings import ServeSettings
from spendgate_server.store.logs import LogStore
from spendgate_server.stores import Stores

__all__ = ["GAUGES", "VIOLATION_DEDUP_MS", "Alerts", "EvaluatorChild", "build_alerts"]

_log = structlog.get_logger("spendgate.alerts")

# A violation id is remembered this long: longer than a journal entry can wait to be
# re-evaluated (its retention), so a late redelivery still finds it.
VIOLATION_DEDUP_MS = 7 * 24 * 3600 * 1000
# How long a watcher waits between checks for new violations when nothing is appended.
WATCH_RECHECK_SECONDS = 5.0
# The message an evaluator child sends its server: ("gauges", pending entries, lag in seconds).
GAUGES = "gauges"

EvaluatorChild = Callable[[ServeSettings, multiprocessing.connection.Connection], None]
"""The entry point of the evaluator's child process: ``(settings, channel to the server)``."""


@dataclass
class Alerts:
    """The pipeline's parts and its background tasks."""

    settings: ServeSettings
    logs: LogStore
    policies: PolicyResolver
    journal: StoreJournal
    feed: ViolationFeed
    evaluator: Evaluator | None = None
    webhook: WebhookSink | None = None
    # The child process running the evaluator and the webhook sink, when they run in one.
    process: ChildProcess | None = None
    # The evaluator and the webhook sink (or their child process), when running.
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(
        self,
        group: asyncio.TaskGroup,
        *,
        evaluate: bool,
        metrics: Metrics | None = None,
        child: EvaluatorChild | None = None,
        gauges: Callable[[int, float], None] | None = None,
        evaluation: Evaluation | None = None,
    ) -> None:
        """Follow policy changes; with ``evaluate``, also run the evaluator and the webhook sink.

        Each runs as a part of ``group`` (lifecycle.py): if one fails, the process ends.

        Args:
            group: the process's task group.
            evaluate: run the evaluator (and the webhook sink, with ``--webhook-url``).
            metrics: where the evaluator's gauges go.
            child: run them instead in a child process, ``child(settings, channel)``
                (``spendgate serve --store redis``: worker.run_evaluation_child, which runs
                what ``spendgate worker`` runs), with its own store connections, so this
                event loop (which answers Decide) reads no journal. The child's gauges
                reach ``metrics`` through the channel; a child killed by a signal is
                started again, one that fails ends this process with its reason
                (lifecycle.ChildProcess).
            gauges: also given the evaluator's (pending, lag) (the child's channel).
            evaluation: where the evaluator applies the policies (default: a child process
                of its own; a child of ``serve`` evaluates inline, it is that process).
        """
        s = self.settings
        group.create_task(run_part("the policy watcher", self.policies.run(), returns=False))
        if not evaluate:
            return
        if child is not None:
            self.process = ChildProcess(
                "the evaluator",
                child,
                (s,),
                self._gauges_received(metrics),
                # A SIGTERM to the server's process group ends the child at once; the server
                # stops this part after its drain, so the child waits that long to be restarted.
                stopped_grace_seconds=s.drain_seconds + 1.0,
            )
            self.tasks.append(group.create_task(run_part("the evaluator process", self.process.run())))
            _log.info("evaluator_process_starting", webhook=bool(s.webhook_url))
            return
        consumer = default_consumer_name()
        self.evaluator = Evaluator(
            self.logs,
            self.feed,
            self.policies,
            consumer=consumer,
            timings=EvaluatorTimings(
                batch_size=s.evaluator_batch_size,
                claim_idle_ms=s.evaluator_claim_idle_millis,
                idle_poll_seconds=s.evaluator_poll_millis / 1000,
            ),
            metrics=metrics,
            evaluation=evaluation,
            gauges=gauges,
        )
        self.tasks.append(group.create_task(run_part("the evaluator", self.evaluator.run())))
        if s.webhook_url:
            self.webhook = WebhookSink(
                self.logs,
                s.webhook_url,
                s.webhook_secret.encode(),
                consumer=consumer,
                timeout_seconds=s.webhook_timeout_millis / 1000,
                claim_idle_ms=max(s.evaluator_claim_idle_millis, 2 * s.webhook_timeout_millis),
                idle_poll_seconds=s.evaluator_poll_millis / 1000,
            )
            self.tasks.append(group.create_task(run_part("the webhook sink", self.webhook.run())))
        _log.info("evaluator_started", consumer=consumer, webhook=bool(s.webhook_url))

    async def stop(self, grace_seconds: float = 5.0) -> None:
        """Let the evaluator and the sink finish their round (at most ``grace_seconds``) and return.

        What is still running then is cancelled with the rest of the task group.
        """
        for part in (self.evaluator, self.webhook, self.process):
            if part is not None:
                part.stop()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=grace_seconds)

    @staticmethod
    def _gauges_received(metrics: Metrics | None) -> Callable[[Any], None]:
        def received(message: Any) -> None:
            match message:
                case (str() as kind, int() as pending, float() as lag) if kind == GAUGES:
                    if metrics is not None:
                        metrics.evaluator_pending.set(pending)
                        metrics.journal_lag.set(lag)
                case _:
                    _log.warning("evaluator_process_message_unknown", message=repr(message)[:200])

        return received


def build_alerts(settings: ServeSettings, stores: Stores) -> Alerts:
    """The pipeline over the process's stores (stores.py chose their backend)."""
    logs = stores.logs
    policies = PolicyResolver(stores.policies, settings.config_poll_millis / 1000)
    journal = StoreJournal(
        logs,
        max_entries=settings.journal_max_entries,
        journals_prompts=policies.journals_prompts,
        intents=settings.journal_intent_grace_seconds > 0,
    )
    feed = ViolationFeed(
        logs, max_entries=settings.violations_max_entries, dedup_window_ms=VIOLATION_DEDUP_MS
    )
    return Alerts(settings, logs, policies, journal, feed)
