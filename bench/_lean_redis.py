"""A lean Redis client for the hot path: one pipelined connection, RESP packed by hand, hiredis parsing.

Bench-only prototype of the ``lean_redis`` lever (bench/variants.py): what
``RedisStore`` would gain by sending its one EVALSHA per call without redis-py's
per-command machinery (connection pool checkout, retry wrapper, per-call timeout
context, argument encoders). Every caller shares one TCP connection; replies come
back in order, so a FIFO of futures matches them. A watchdog fails every pending
call (and drops the connection) when the oldest one is older than the timeout.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, cast

import hiredis

__all__ = ["PipelinedRedis", "ReplyError", "pack_command"]

ReplyError = hiredis.ReplyError


def pack_command(parts: tuple[Any, ...]) -> bytes:
    """RESP encoding of one command (bytes, str and int arguments)."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


class _Connection(asyncio.Protocol):
    def __init__(self, batch_writes: bool) -> None:
        self.reader = hiredis.Reader()
        self.pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.sent_at: collections.deque[float] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None
        self._batch = batch_writes
        self._buffer: list[bytes] = []
        self._flush_scheduled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            future = self.pending.popleft()
            self.sent_at.popleft()
            if future.done():  # the caller was cancelled; the reply is dropped in order
                continue
            if isinstance(reply, ReplyError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionError("redis closed the connection")
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(ConnectionError(f"redis connection lost: {self.lost}"))
        self.sent_at.clear()

    def send(self, payload: bytes, future: asyncio.Future[Any]) -> None:
        assert self.transport is not None
        self.pending.append(future)
        self.sent_at.append(time.monotonic())
        if not self._batch:
            self.transport.write(payload)
            return
        # Coalesce every command issued in this loop iteration into one write (one syscall).
        self._buffer.append(payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.transport is not None and self._buffer:
            self.transport.write(b"".join(self._buffer))
        self._buffer.clear()


class PipelinedRedis:
    """One shared, pipelined connection to a single Redis node."""

    def __init__(
        self, host: str, port: int, db: int = 0, *, timeout_seconds: float = 0.25, batch_writes: bool = False
    ) -> None:
        self._host, self._port, self._db = host, port, db
        self._timeout = timeout_seconds
        self._batch = batch_writes
        self._conn: _Connection | None = None
        self._connecting: asyncio.Lock | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    async def _connect(self) -> _Connection:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._conn is not None and self._conn.lost is None:
                return self._conn
            loop = asyncio.get_running_loop()
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self._batch), self._host, self._port),
                self._timeout,
            )
            self._conn = conn
            if self._db:
                await self._send(conn, ("SELECT", self._db))
            if self._watchdog is None:
                self._watchdog = loop.call_later(self._timeout / 2, self._check)
            return conn

    def _check(self) -> None:
        conn = self._conn
        if conn is not None and conn.sent_at and time.monotonic() - conn.sent_at[0] > self._timeout:
            # Redis is stuck or gone: fail everything in flight now, reconnect on the next call.
            if conn.transport is not None:
                conn.transport.abort()
            conn.connection_lost(TimeoutError(f"no reply within {self._timeout}s"))
            self._conn = None
        self._watchdog = asyncio.get_running_loop().call_later(self._timeout / 2, self._check)

    async def _send(self, conn: _Connection, parts: tuple[Any, ...]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        conn.send(pack_command(parts), future)
        return await future

    async def call(self, *parts: Any) -> Any:
        """Send one command and wait for its reply (a ReplyError is raised as such)."""
        conn = self._conn
        if conn is None or conn.lost is not None:
            conn = await self._connect()
        return await self._send(conn, parts)

    async def close(self) -> None:
        """Drop the connection."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()
        self._conn = None
