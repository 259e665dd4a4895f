"""Composition of the journal, policies and alerts pipeline, shared by ``serve`` and ``worker``.

the process's stores (stores.py: log store and policy store) → policy resolver →
journal (for the engine), violations feed (for the servicer), evaluator and
webhook sink (background tasks).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import structlog

from spendgate_server.lifecycle import run_part
from spendgate_server.metrics import Metrics
from spendgate_server.policy.evaluator import Evaluator, EvaluatorTimings, default_consumer_name
from spendgate_server.policy.journal import StoreJournal
from spendgate_server.policy.remote_policies import PolicyResolver
from spendgate_server.policy.violations import ViolationFeed
from spendgate_server.policy.webhook import WebhookSink
from spendgate_server.settings import ServeSettings
from spendgate_server.store.logs import LogStore
from spendgate_server.stores import Stores

__all__ = ["VIOLATION_DEDUP_MS", "Alerts", "build_alerts"]

_log = structlog.get_logger("spendgate.alerts")

# A violation id is remembered this long: longer than a journal entry can wait to be
# re-evaluated (its retention), so a late redelivery still finds it.
VIOLATION_DEDUP_MS = 7 * 24 * 3600 * 1000
# How long a watcher waits between checks for new violations when nothing is appended.
WATCH_RECHECK_SECONDS = 5.0


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
    # The evaluator and the webhook sink, when running.
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self, group: asyncio.TaskGroup, *, evaluate: bool, metrics: Metrics | None = None) -> None:
        """Follow policy changes; with ``evaluate``, also run the evaluator and the webhook sink.

        Each runs as a part of ``group`` (lifecycle.py): if one fails, the process ends.
        """
        s = self.settings
        group.create_task(run_part("the policy watcher", self.policies.run(), returns=False))
        if not evaluate:
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
        for part in (self.evaluator, self.webhook):
            if part is not None:
                part.stop()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=grace_seconds)


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
