"""A Decide answered UNAVAILABLE leaves no state: reserves whose answer was never heard are cancelled.

A reserve that times out (a hung Redis, a Redis paused by SIGSTOP) was already sent:
the store may run it when it wakes, after the server answered UNAVAILABLE and the
client applied its fail mode. Left alone, that reservation would be counted at its
estimate for a call the service never admitted (phantom spend), its tool calls and
dedup mark would stay, and a client retrying its request id would be replayed a
decision it never saw. So the engine hands every such reserve to this canceller,
which sends its cancel (store.CancelRequest) until the store answers: the cancel
undoes what the reserve recorded or, if it has not run yet, leaves a tombstone that
makes it change nothing when it does.

Nothing is cancelled for calls the circuit breaker refused (they never reached the
store). Pending cancels are bounded (``max_pending``); past the bound the oldest is
dropped and counted, and its reservation, if the store ever applies it, expires at
its estimate as any unsettled one does.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

import structlog

from spendgate_server.errors import StoreUnavailable
from spendgate_server.store import CancelRequest, CancelStatus, ReserveRequest, Store

__all__ = ["ReserveCanceller"]

_log = structlog.get_logger("spendgate.engine")


class ReserveCanceller:
    """Cancels reserves whose outcome was never heard, retrying until the store answers.

    Args:
        store: where the reserves went.
        clock: Unix milliseconds (the cancel's now).
        max_pending: bound on cancels waiting for the store.
        retry_min_seconds: first pause between rounds while the store does not answer.
        retry_max_seconds: the pause doubles up to this.
        batch: cancels sent concurrently in one round.
    """

    def __init__(
        self,
        store: Store,
        clock: Callable[[], int],
        *,
        max_pending: int = 10_000,
        retry_min_seconds: float = 0.05,
        retry_max_seconds: float = 1.0,
        batch: int = 64,
    ) -> None:
        self._store = store
        self._clock = clock
        self._max_pending = max_pending
        self._retry_min = retry_min_seconds
        self._retry_max = retry_max_seconds
        self._batch = batch
        self._pending: collections.OrderedDict[str, ReserveRequest] = collections.OrderedDict()
        self._task: asyncio.Task[None] | None = None
        # How each cancel ended (CancelStatus names), plus "dropped" and "failed".
        self.outcomes: collections.Counter[str] = collections.Counter()

    @property
    def pending(self) -> int:
        """Cancels waiting for the store to answer."""
        return len(self._pending)

    def submit(self, reserve: ReserveRequest) -> None:
        """Cancel ``reserve`` as soon as the store answers (in a background task)."""
        if len(self._pending) >= self._max_pending:
            self._pending.popitem(last=False)
            self.outcomes["dropped"] += 1
        self._pending[reserve.reservation_id] = reserve
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def drain_once(self) -> int:
        """Send every pending cancel once; returns how many the store answered (and are done)."""
        answered = 0
        for start in range(0, len(self._pending), self._batch):
            chunk = list(self._pending.values())[start : start + self._batch]
            results = await asyncio.gather(
                *(self._store.cancel(CancelRequest.undoing(r, self._clock())) for r in chunk),
                return_exceptions=True,
            )
            for reserve, result in zip(chunk, results, strict=True):
                if isinstance(result, StoreUnavailable):
                    continue  # still unreachable: the next round tries again
                self._pending.pop(reserve.reservation_id, None)
                answered += 1
                if isinstance(result, CancelStatus):
                    self.outcomes[result.name.lower()] += 1
                elif isinstance(result, BaseException):
                    self.outcomes["failed"] += 1
                    _log.error(
                        "reserve_cancel_failed", reservation_id=reserve.reservation_id, exc_info=result
                    )
        return answered

    async def _run(self) -> None:
        delay = self._retry_min
        before = self.outcomes.copy()
        while self._pending:
            if await self.drain_once():
                delay = self._retry_min
            elif self._pending:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)
        done = self.outcomes - before
        _log.info("unanswered_reserves_cancelled", **dict(sorted(done.items())))
