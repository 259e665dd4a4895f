"""The hot path's Redis connection: one pipelined connection shared by every call.

``make bench`` found redis-py's per-command machinery (pool checkout, retry wrapper,
timeout context, encoders) to be the largest part of a Decide after gRPC itself, so
the Decide and Settle scripts go over this instead: RESP packed by hand, replies
parsed by hiredis, matched to callers in order (Redis answers a connection's commands
in the order sent), and every command issued in one event-loop iteration written with
one syscall. A watchdog fails everything in flight, and drops the connection, once
the oldest command has waited longer than the timeout, so a hung Redis costs callers
one timeout and no more. Nothing is ever retried (a retried script could reserve twice),
except a NOSCRIPT reply, which means the script never ran.

Only plain ``redis://`` URLs use it; TLS, Unix sockets and clusters stay on redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import time
from typing import Any, cast

import hiredis

from spendgate_server.errors import StoreUnavailable

__all__ = ["PipelinedRedis", "ScriptError"]

# Replies that mean Redis cannot serve right now, not that our script is wrong.
_OUTAGE_PREFIXES = (
    "OOM",
    "READONLY",
    "BUSY",
    "LOADING",
    "MASTERDOWN",
    "NOREPLICAS",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "NOAUTH",
)


class ScriptError(RuntimeError):
    """Redis ran one of our scripts and it failed: a bug, reported as INTERNAL."""


def _pack(parts: tuple[Any, ...]) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.sent_at: collections.deque[float] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None
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
            if future.done():  # its caller gave up; the reply is consumed in order all the same
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.lost is None:
            self.lost = exc or ConnectionError("redis closed the connection")
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(ConnectionError(f"redis connection lost: {self.lost}"))
        self.sent_at.clear()

    def send(self, payload: bytes, future: asyncio.Future[Any]) -> None:
        self.pending.append(future)
        self.sent_at.append(time.monotonic())
        self._buffer.append(payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.transport is not None and self.lost is None and self._buffer:
            self.transport.write(b"".join(self._buffer))
        self._buffer.clear()


class PipelinedRedis:
    """One shared, pipelined connection to a single Redis node, opened on first use."""

    def __init__(
        self,
        host: str,
        port: int,
        db: int = 0,
        *,
        username: str | None = None,
        password: str | None = None,
        timeout_seconds: float = 0.1,
        client_name: str | None = None,
    ) -> None:
        self._host, self._port, self._db = host, port, db
        # Set with CLIENT SETNAME on each connection, so CLIENT LIST can attribute it.
        self._client_name = client_name
        self._username, self._password = username, password
        self._timeout = timeout_seconds
        self._conn: _Connection | None = None
        self._connecting: asyncio.Lock | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._shas: dict[str, str] = {}

    async def _connect(self) -> _Connection:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._conn is not None and self._conn.lost is None:
                return self._conn
            loop = asyncio.get_running_loop()
            handshake: list[tuple[Any, ...]] = []
            if self._password is not None:
                handshake.append(
                    ("AUTH", self._username, self._password) if self._username else ("AUTH", self._password)
                )
            if self._db:
                handshake.append(("SELECT", self._db))
            if self._client_name:
                handshake.append(("CLIENT", "SETNAME", self._client_name))
            conn: _Connection | None = None
            try:
                # One bound for connecting and the handshake: a Redis that accepts connections but
                # never answers (stopped, overloaded) must cost a caller one timeout, no more.
                async with asyncio.timeout(self._timeout):
                    _, conn = await loop.create_connection(_Connection, self._host, self._port)
                    # Sent together, answered in order: one round trip.
                    await asyncio.gather(*(self._send(conn, command) for command in handshake))
            except (OSError, TimeoutError, StoreUnavailable) as exc:
                if conn is not None and conn.transport is not None:
                    conn.transport.abort()
                if isinstance(exc, StoreUnavailable):
                    raise
                reason = str(exc) or f"no answer within {self._timeout * 1000:.0f} ms"
                raise StoreUnavailable(f"redis {self._host}:{self._port}: {reason}") from exc
            self._conn = conn
            if self._watchdog is None:
                self._watchdog = loop.call_later(self._timeout / 2, self._check)
            return conn

    def _check(self) -> None:
        conn = self._conn
        if conn is not None and conn.sent_at and time.monotonic() - conn.sent_at[0] > self._timeout:
            # Redis is stuck or unreachable: fail everything in flight now, reconnect on the next call.
            conn.connection_lost(TimeoutError(f"no reply from redis within {self._timeout * 1000:.0f} ms"))
            if conn.transport is not None:
                conn.transport.abort()
            self._conn = None
        self._watchdog = asyncio.get_running_loop().call_later(self._timeout / 2, self._check)

    async def _send(self, conn: _Connection, parts: tuple[Any, ...]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        conn.send(_pack(parts), future)
        try:
            return await future
        except (ConnectionError, OSError) as exc:
            raise StoreUnavailable(f"redis {self._host}:{self._port}: {exc}") from exc

    async def call(self, *parts: Any) -> Any:
        """Send one command and return its reply.

        Raises:
            StoreUnavailable: Redis is unreachable, late, or answered that it cannot serve.
            hiredis.ReplyError: any other error reply.
        """
        conn = self._conn
        if conn is None or conn.lost is not None:
            conn = await self._connect()
        try:
            return await self._send(conn, parts)
        except hiredis.ReplyError as exc:
            if str(exc).startswith(_OUTAGE_PREFIXES):
                raise StoreUnavailable(f"redis: {exc}") from exc
            raise

    async def run_script(self, source: str, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA ``source``, loading it when Redis does not have it (a restart empties the cache).

        Raises:
            StoreUnavailable: as for :meth:`call`.
            ScriptError: the script failed.
        """
        sha = self._shas.get(source)
        if sha is None:
            sha = self._shas[source] = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
        try:
            try:
                return await self.call("EVALSHA", sha, len(keys), *keys, *args)
            except hiredis.ReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
            # NOSCRIPT: the script did not run, so running it now is not a retry.
            await self.call("SCRIPT", "LOAD", source)
            return await self.call("EVALSHA", sha, len(keys), *keys, *args)
        except hiredis.ReplyError as exc:
            raise ScriptError(f"spendgate Lua script failed: {exc}") from exc

    async def close(self) -> None:
        """Drop the connection and stop the watchdog."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()
        self._conn = None
