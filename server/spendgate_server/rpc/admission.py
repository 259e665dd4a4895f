"""Admission control: past capacity a call is answered promptly, never left to queue.

A server past its capacity used to take every call and share its CPU among all of
them: each waited longer and longer, and all of them missed their deadlines together
(``make bench``: at 1.5x its capacity goodput fell to 0.1-0.45x, every refusal a client
timeout at 250 ms). Where calls wait, measured (``python -m bench.overload``): a call
waits in gRPC's core, where no Python code sees it, until the event loop takes it up,
and a CPU-bound ``grpc.aio`` server takes calls up one per loop turn, about as fast as
it finishes them, so its calls in flight stay few (under 16) while that hidden queue
grows; past HTTP/2's stream limit the calls wait in the *client's* channel instead
(gRPC holds them there for a stream; it does not fail them). Admitted calls waited
~190 ms, and refusals (streams refused, UNAVAILABLE) came back after ~180 ms too.

Refusing here does not make room either: a call the server refuses costs it about
three quarters of one it serves (0.39 against 0.51 ms of CPU, ``grpc.aio``'s own cost
per call), so a server offered 1.5x cannot even refuse all the excess. The excess
must be refused where it costs the server nothing, in the client: the Python client
holds at most ``max_outstanding`` calls awaiting an answer (64, the bound below) and
lowers that limit (AIMD) when answers say the server is overloaded or late. The
server's part:

* **calls in flight** (``--max-in-flight``, per process): a call of the hot path
  (Decide, Settle, SettleBatch) is counted from the moment the server takes it up (its
  handler starts) until its handler ends, however it ends; past the bound the answer is
  RESOURCE_EXHAUSTED at once, naming the flag, before authentication or parsing. This is
  what a slow store meets: calls waiting on it pile up here, not in memory.
* **the deadline**: a call taken up with no more of its deadline left than calls take
  these days (a moving average of recent ones) is answered DEADLINE_EXCEEDED at once,
  saying so: its answer could not reach the client in time, so no work is started.
* **the queue** (``--queue-target-percent``, 20): a client that sends its whole timeout
  (:data:`TIMEOUT_METADATA`; the Python client does) tells the server, with what is
  left of it at take-up, how long the call waited. CoDel's rule (:meth:`Admission.queued`)
  then sheds calls that waited past 20% of their timeout once no call has come through
  within its target for 100 ms: a standing queue, not a burst. Those RESOURCE_EXHAUSTED
  answers are what lowers the clients' limits, so a fleet of clients, whose bounds add
  up past what the server serves, stops feeding the queue.
* **streams per connection** (:func:`stream_options`): HTTP/2's stream limit bounds
  the hidden queue per connection, for clients that bound nothing themselves; the calls
  past it wait in those clients (see above), and the client bound sits below it.

The in-flight bound is derived from measured capacity: a worker answers about C calls
a second (``make bench``, closed loop), so N calls in flight wait about N / C; N = 64 at
the ~2,000-3,000 calls/s one worker measured keeps that near 20-30 ms, far inside the
clients' 250 ms deadline, while 32 callers already saturate the worker.

This module decides; rpc/guard.py applies the decisions, in the one wrapper it puts around
each hot-path handler at registration (no gRPC interceptor runs per call).
"""

from __future__ import annotations

from collections.abc import Iterable

from spendgate_server.errors import DeadlineExceeded, ResourceExhausted

__all__ = [
    "HOT_METHODS",
    "QUEUE_INTERVAL_SECONDS",
    "TIMEOUT_METADATA",
    "Admission",
    "sent_timeout_seconds",
    "stream_options",
]

HOT_METHODS = frozenset(
    f"/spendgate.v1.DecisionService/{name}" for name in ("Decide", "Settle", "SettleBatch")
)
# Weight of the newest call in the moving average of service times.
_SMOOTHING = 0.05
# The whole timeout a client gave its call, in milliseconds: with what is left of it when the
# server takes the call up, how long the call waited (gRPC's own grpc-timeout header is read by
# gRPC's core and never reaches Python).
TIMEOUT_METADATA = "x-spendgate-timeout-ms"
# CoDel's interval: calls have waited past the target this long without a break, so the
# queue is standing (past capacity), not a burst that is draining.
QUEUE_INTERVAL_SECONDS = 0.1
_MAX_SENT_TIMEOUT_MILLIS = 24 * 3600 * 1000


def sent_timeout_seconds(metadata: Iterable[tuple[str, str | bytes]] | None) -> float | None:
    """The timeout the client gave the call (:data:`TIMEOUT_METADATA`), in seconds; None when it
    sent none, or one that is no whole number of milliseconds in (0, 1 day] (only a hint)."""
    for key, value in metadata or ():
        if key == TIMEOUT_METADATA:
            if not isinstance(value, str) or not (value.isascii() and value.isdigit()):
                return None
            millis = int(value)
            return millis / 1000 if 0 < millis <= _MAX_SENT_TIMEOUT_MILLIS else None
    return None


def stream_options(max_in_flight: int, max_watch_streams_per_tenant: int) -> list[tuple[str, int]]:
    """gRPC server options bounding the calls one connection may have open at once.

    A call waits in gRPC's core, where no Python code sees it, until the server's event
    loop takes it up; past capacity that hidden queue, not the calls in flight, is what
    grows. HTTP/2's ``SETTINGS_MAX_CONCURRENT_STREAMS`` bounds it per connection. It does
    not refuse the calls past it at once: a gRPC client keeps them in its channel until a
    stream frees, and the server refuses (RST_STREAM REFUSED_STREAM, UNAVAILABLE for the
    client) only those that race a closing stream, after they waited too. So it bounds
    the queue of clients that bound nothing; the Python client's own bound sits below it.
    The bound leaves room for the watch streams a tenant may hold open on the same
    connection beside ``max_in_flight`` calls. Nothing when ``max_in_flight`` is 0.
    """
    if not max_in_flight:
        return []
    return [("grpc.max_concurrent_streams", max_in_flight + max_watch_streams_per_tenant)]


class Admission:
    """The in-flight bound, the queue's state and the recent service time of one process.

    Args:
        max_in_flight: calls served at once before the next is refused (0: no bound).
        initial_service_seconds: the service time assumed before any call was timed.
        queue_target_percent: the share of its timeout a call may wait before take-up
            while calls queue (0: any wait).
        queue_interval_seconds: how long no call may have come through within its target
            before the queue counts as standing and calls past their target are shed.
    """

    def __init__(
        self,
        max_in_flight: int,
        initial_service_seconds: float = 0.0,
        queue_target_percent: int = 0,
        queue_interval_seconds: float = QUEUE_INTERVAL_SECONDS,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.service_seconds = initial_service_seconds
        self.queue_target_percent = queue_target_percent
        self.queue_interval_seconds = queue_interval_seconds
        # When a call last came through within its target (None: none has waited past one since
        # the queue last drained), and when the last call with a sent timeout was taken up.
        self._short_at: float | None = None
        self._last_at: float | None = None

    def queued(self, waited_seconds: float, timeout_seconds: float, now: float) -> ResourceExhausted | None:
        """Why a call with a timeout of ``timeout_seconds`` taken up at ``now`` (seconds, any
        clock) after waiting ``waited_seconds`` is shed, or None when it is served.

        CoDel's rule, as RPC servers apply it to their request queue, with each call's target
        ``queue_target_percent`` of its own timeout: a wait past the target is tolerated
        while the queue drains (some call came through within its target during the last
        interval); once none has for a whole interval the queue is standing, and calls
        that waited past their target are refused until one comes through within it. The
        clients take those refusals as a sign to send fewer calls at once (the Python
        client's ``max_outstanding`` limit), so the queue shrinks and admitted calls wait
        about the target, not the deadline. A whole interval with no call taken up means
        the queue drained (a standing queue keeps the server taking calls up): sparse
        calls that each waited long, say for a new connection, are never shed.
        """
        if not self.queue_target_percent:
            return None
        if self._last_at is not None and now - self._last_at >= self.queue_interval_seconds:
            self._short_at = None
        self._last_at = now
        target = timeout_seconds * self.queue_target_percent / 100
        if waited_seconds <= target:
            self._short_at = now
            return None
        if self._short_at is None:
            self._short_at = now  # the first wait past a target starts the interval
        standing = now - self._short_at
        if standing < self.queue_interval_seconds:
            return None
        return ResourceExhausted(
            "queue_target_percent",
            f"server overloaded: the call waited {waited_seconds * 1000:.0f} ms before the server "
            f"took it up, past {self.queue_target_percent}% of its {timeout_seconds * 1000:.0f} ms "
            f"timeout, and no call has come through within its target for {standing * 1000:.0f} ms "
            f"(--queue-target-percent {self.queue_target_percent}); let the client's fail mode decide",
        )

    def late(self, remaining_seconds: float | None) -> DeadlineExceeded | None:
        """Why a call with ``remaining_seconds`` of its deadline left (None: it has none) cannot
        be answered in time, or None when it can."""
        if remaining_seconds is None or remaining_seconds > self.service_seconds:
            return None
        if remaining_seconds <= 0:
            return DeadlineExceeded(
                "deadline exceeded before the server took the call up: it waited in the "
                "server's queue past its deadline (the server is overloaded)"
            )
        return DeadlineExceeded(
            f"deadline too close to answer in time: {remaining_seconds * 1000:.1f} ms left, "
            f"calls take about {self.service_seconds * 1000:.1f} ms here now"
        )

    def full(self) -> ResourceExhausted | None:
        """Why one more call cannot be taken now (``max_in_flight`` are), or None when it can."""
        if not self.max_in_flight or self.in_flight < self.max_in_flight:
            return None
        return ResourceExhausted(
            "max_in_flight",
            f"server at capacity: {self.in_flight} call{'' if self.in_flight == 1 else 's'} in flight "
            f"(--max-in-flight "
            f"{self.max_in_flight}); try another server, or let the client's fail mode decide",
        )

    def refusal(
        self, remaining_seconds: float | None, sent_timeout_seconds: float | None, now: float
    ) -> DeadlineExceeded | ResourceExhausted | None:
        """Why a call just taken up at ``now`` is refused (:meth:`late`, then :meth:`queued`), or
        None when it is served.

        Args:
            remaining_seconds: what is left of its deadline (None: it has none).
            sent_timeout_seconds: the whole timeout its client sent (None: it sent none, and then
                the wait cannot be known and the queue rule does not apply).
            now: seconds, the clock :meth:`queued` is given.
        """
        late = self.late(remaining_seconds)
        if late is not None or remaining_seconds is None or sent_timeout_seconds is None:
            return late
        return self.queued(sent_timeout_seconds - remaining_seconds, sent_timeout_seconds, now)

    def enter(self) -> None:
        """A call was taken up."""
        self.in_flight += 1

    def leave(self, seconds: float) -> None:
        """A call taken up ``seconds`` ago has ended (answered, refused, failed or cancelled)."""
        self.in_flight -= 1
        self.service_seconds += _SMOOTHING * (seconds - self.service_seconds)
