"""A Store decorator that times every operation and counts failures."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
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

    async def _timed(self, op: str, call: Callable[[], Awaitable[_T]]) -> _T:
        started = time.perf_counter()
        try:
            return await call()
        except Exception:
            self._errors.labels(op).inc()
            raise
        finally:
            self._seconds.labels(op).observe(time.perf_counter() - started)

    async def reserve(self, request: ReserveRequest) -> ReserveOutcome:
        return await self._timed("reserve", lambda: self._inner.reserve(request))

    async def settle(self, request: SettleRequest) -> SettleOutcome:
        return await self._timed("settle", lambda: self._inner.settle(request))

    async def settle_record(
        self, session: SessionKey, reservation_id: str, now_ms: int
    ) -> SettleRecord | None:
        return await self._timed(
            "settle_record", lambda: self._inner.settle_record(session, reservation_id, now_ms)
        )

    async def cancel(self, request: CancelRequest) -> CancelStatus:
        return await self._timed("cancel", lambda: self._inner.cancel(request))

    async def session_state(self, session: SessionKey, now_ms: int, session_ttl_ms: int) -> SessionState:
        return await self._timed("state", lambda: self._inner.session_state(session, now_ms, session_ttl_ms))

    async def ping(self) -> None:
        await self._timed("ping", self._inner.ping)

    async def close(self) -> None:
        await self._inner.close()
