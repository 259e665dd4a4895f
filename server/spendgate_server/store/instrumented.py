"""A Store decorator that times every operation and counts failures.

About 1 µs a call, most of it the histogram's update (``python -m bench.micro``, "store
layers"): well under 1% of a Decide's server CPU, so it stays a layer of its own (see
store/breaker.py).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TypeVar

from prometheus_client import Counter, Histogram

from spendgate_server.store.base import (
    CancelRequest,
    CancelStatus,
    ReserveOutcome,
    ReserveRequest,
    SessionKey,
    SessionState,
    SettleOutcome,
    SettleRecord,
    SettleRequest,
    Store,
)

__all__ = ["InstrumentedStore"]

_T = TypeVar("_T")


class InstrumentedStore(Store):
    """Wraps ``inner``; behaviour is unchanged, durations and errors are recorded by operation."""

    def __init__(self, inner: Store, seconds: Histogram, errors: Counter) -> None:
        self._inner = inner
        self._seconds = seconds
        self._errors = errors
        # Each operation's labelled children, looked up once: labels() takes a lock and builds
        # a key on every call, and reserve and settle run on every Decide and Settle.
        self._reserve = self._op("reserve")
        self._settle = self._op("settle")

    def _op(self, op: str) -> tuple[Histogram, Counter]:
        return self._seconds.labels(op), self._errors.labels(op)

    async def _timed(self, children: tuple[Histogram, Counter], call: Awaitable[_T]) -> _T:
        started = time.perf_counter()
        try:
            return await call
        except Exception:
            children[1].inc()
            raise
        finally:
            children[0].observe(time.perf_counter() - started)

    async def reserve(self, request: ReserveRequest) -> ReserveOutcome:
        return await self._timed(self._reserve, self._inner.reserve(request))

    async def settle(self, request: SettleRequest) -> SettleOutcome:
        return await self._timed(self._settle, self._inner.settle(request))

    async def settle_record(
        self, session: SessionKey, reservation_id: str, now_ms: int
    ) -> SettleRecord | None:
        return await self._timed(
            self._op("settle_record"), self._inner.settle_record(session, reservation_id, now_ms)
        )

    async def cancel(self, request: CancelRequest) -> CancelStatus:
        return await self._timed(self._op("cancel"), self._inner.cancel(request))

    async def session_state(self, session: SessionKey, now_ms: int, session_ttl_ms: int) -> SessionState:
        return await self._timed(
            self._op("state"), self._inner.session_state(session, now_ms, session_ttl_ms)
        )

    async def ping(self) -> None:
        await self._timed(self._op("ping"), self._inner.ping())

    async def close(self) -> None:
        await self._inner.close()
