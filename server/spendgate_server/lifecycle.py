"""How a server process lives and ends: its parts run in one task group, and the first fatal
error of any part ends the whole process with one line naming the reason and an exit code.

``serve`` and ``worker`` run every long-lived part (the gRPC server, the key check, the
evaluator, the watchers, the metrics endpoint, ...) as a task of one
:class:`asyncio.TaskGroup` through :func:`run_part`. A part that raises fails the
group: the other parts are cancelled, and the process exits with :data:`EXIT_FAILED`
(or :data:`EXIT_CONFIG` when the cause is a setting) after printing
``spendgate: <reason>`` on stderr. Nothing is left running without its gRPC port.

A part may be a child process (:class:`ChildProcess`: the evaluator of ``serve --store
redis``): it is killed by PID when its part stops, replaced when a signal killed it,
and ends the process with its own reason when it exited with one. The child ends
itself when this process dies, however it dies (:func:`parent_gone`).

Two guards keep the exit prompt whatever a library does: a part that swallows its
cancellation (redis-py commands under Python 3.11 can: ``asyncio.wait_for`` there
drops a cancel that arrives as the command completes) is cancelled again until it
ends, and once a process has decided to end, a watchdog thread ends it after
:data:`UNWIND_SECONDS` if unwinding hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NoReturn

import structlog

from spendgate_server.errors import ConfigError, SpendgateError

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_OK",
    "UNWIND_SECONDS",
    "ChildFailed",
    "ChildProcess",
    "PartFailed",
    "Stopped",
    "arm_exit_deadline",
    "fatal_reason",
    "parent_gone",
    "report_once",
    "run_child",
    "run_part",
    "run_process",
    "set_reporter",
    "watch_thread",
]

EXIT_OK = 0
"""Stopped on SIGTERM or SIGINT, after draining."""
EXIT_FAILED = 1
"""A part of the running process failed (the line names it)."""
EXIT_CONFIG = 2
"""The process cannot start as configured: a flag, a file, a port, Redis, API keys."""

# Bound on unwinding once the process has decided to end (parts cancelled, connections closed).
UNWIND_SECONDS = 5.0
# How often a part that ignored its cancellation is cancelled again.
_RECANCEL_SECONDS = 0.25

_log = structlog.get_logger("spendgate.lifecycle")
_deadline_lock = threading.Lock()
_deadline: threading.Timer | None = None
# The first part that failed in this process, as (exit code, reason line).
_failure: tuple[int, str] | None = None


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def _failures(error: BaseException) -> list[BaseException]:
    """The errors in ``error`` (a group's, in order), without the cancellations and stops they caused."""
    return [leaf for leaf in _leaves(error) if not isinstance(leaf, Stopped | asyncio.CancelledError)]


class Stopped(Exception):  # a signal to end the task group, not an error
    """Raised by the part that handles SIGTERM once the drain is over: it ends the task group."""


class PartFailed(SpendgateError):
    """A part of the process failed; the process ends with its reason.

    Args:
        part: names the part, as the reason line shows it (``the evaluator``).
        error: what it raised.
    """

    def __init__(self, part: str, error: BaseException) -> None:
        self.part = part
        # A part that runs a task group of its own fails with a group: its first error is the cause.
        self.error = next(iter(_failures(error)), error)
        cause = self.error
        detail = str(cause) if isinstance(cause, SpendgateError) else f"{type(cause).__name__}: {cause}"
        super().__init__(f"{part} failed: {detail}")

    @property
    def exit_code(self) -> int:
        """:data:`EXIT_CONFIG` when a setting is the cause, else :data:`EXIT_FAILED`."""
        return EXIT_CONFIG if isinstance(self.error, ConfigError) else EXIT_FAILED


def fatal_reason(error: BaseException) -> tuple[int, str] | None:
    """The exit code and the one-line reason of what ended a process; None for a clean stop.

    ``error`` may be a task group's exception group: its first failure is the reason
    (the cancellations and :class:`Stopped` it also holds are consequences).
    """
    failures = _failures(error)
    if not failures:
        return None
    first = failures[0]
    if isinstance(first, PartFailed):
        return first.exit_code, str(first)
    if isinstance(first, ConfigError):
        return EXIT_CONFIG, str(first)
    if isinstance(first, KeyboardInterrupt):
        return None
    return EXIT_FAILED, f"{type(first).__name__}: {first}"


async def watch_thread(thread: threading.Thread, interval_seconds: float = 1.0) -> None:
    """Return once ``thread`` has ended: for a part that is a thread (the metrics endpoint)."""
    # A thread's end is not awaitable, and joining it in an executor thread would outlive a cancel.
    while thread.is_alive():  # noqa: ASYNC110
        await asyncio.sleep(interval_seconds)


def _print_line(_code: int, line: str) -> None:
    print(line, file=sys.stderr, flush=True)


_reporter: Callable[[int, str], None] = _print_line
_reported = False


def set_reporter(report: Callable[[int, str], None]) -> None:
    """Where this process's reason goes instead of stderr (a ``--workers`` child: its supervisor)."""
    global _reporter  # one reporter per process
    _reporter = report


def report_once(code: int, line: str) -> None:
    """Give the reason line to the reporter; only the first reason of a process counts."""
    global _reported  # one reason per process
    with _deadline_lock:
        if _reported:
            return
        _reported = True
    # One line, whatever the error's text holds.
    _reporter(code, " ".join(line.split()))


def arm_exit_deadline(code: int, line: str | None, seconds: float = UNWIND_SECONDS) -> None:
    """End the process with ``code`` (reporting ``line``) if it is still alive ``seconds`` from now.

    For a process that has decided to end: whatever hangs while it unwinds (a part that
    will not stop, a connection that will not close), it ends promptly all the same.
    The first call wins; later ones change nothing.
    """
    global _deadline  # one watchdog per process
    with _deadline_lock:
        if _deadline is not None:
            return

        def expire() -> None:
            if line is not None:
                report_once(code, line)
            _log.error("exit_forced", after_seconds=seconds, exit_code=code)
            os._exit(code)

        _deadline = threading.Timer(seconds, expire)
        _deadline.daemon = True
        _deadline.start()


async def _cancel(task: asyncio.Task[Any], part: str) -> None:
    """Cancel ``task`` until it ends (a cancel it swallowed is repeated), for at most UNWIND_SECONDS."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + UNWIND_SECONDS
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=_RECANCEL_SECONDS)
        if loop.time() > give_up:
            _log.error("part_did_not_stop", part=part)
            return


async def run_part(part: str, work: Coroutine[Any, Any, None], *, returns: bool = True) -> None:
    """Run one part of the process in a task of its own.

    Args:
        part: names the part in the reason line (``the evaluator``, ``the key check``).
        work: the part's coroutine.
        returns: whether the part may end by itself (a watcher that stops when asked);
            when False, ending at all is a failure.

    Raises:
        PartFailed: ``work`` raised (or ended, when it must not): the task group then
            cancels every other part and the process ends with this reason.
    """
    task = asyncio.create_task(work, name=part)
    try:
        # asyncio.wait, unlike awaiting the task, leaves it running when this part is cancelled,
        # so _cancel can make sure it really stops.
        await asyncio.wait({task})
    except asyncio.CancelledError:
        await _cancel(task, part)
        raise
    if task.cancelled():
        error: BaseException = RuntimeError("cancelled from outside its task group")
    else:
        raised = task.exception()
        if raised is None:
            if returns:
                return
            raised = RuntimeError("stopped unexpectedly")
        error = raised
    failure = PartFailed(part, error)
    _log.error(
        "part_failed",
        part=part,
        error=str(failure),
        exc_info=None if isinstance(failure.error, SpendgateError) else failure.error,
    )
    global _failure  # one first failure per process
    if _failure is None:
        _failure = (failure.exit_code, f"spendgate: {failure}")
    arm_exit_deadline(*_failure)
    raise failure from error


def run_process(main: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """Run ``main()`` on uvloop (asyncio's loop where uvloop is missing) to the end; return the exit code.

    A failure is reported once (stderr, or the reporter set for this process) as
    ``spendgate: <reason>``. Whatever ends ``main``, the exit deadline is armed before the
    event loop unwinds, so tasks that will not stop cannot keep the process alive.
    """

    def ending(error: BaseException) -> tuple[int, str] | None:
        reason = fatal_reason(error)
        if reason is not None:
            return reason[0], f"spendgate: {reason[1]}"
        # A failed part can surface as a cancellation of what was cleaning up after it.
        return _failure

    async def guarded() -> None:
        try:
            await main()
        except BaseException as error:
            end = ending(error)
            arm_exit_deadline(*(end or (EXIT_OK, None)))
            raise
        arm_exit_deadline(*(_failure or (EXIT_OK, None)))

    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
            asyncio.run(guarded())
        else:
            # uvloop measured ~8% more closed-loop throughput than asyncio's loop (make bench).
            uvloop.run(guarded())
    except BaseException as error:  # every ending becomes a code and one line
        if isinstance(error, KeyboardInterrupt):
            return 130
        end = ending(error)
        if end is None:
            return EXIT_OK
        if not isinstance(error, SpendgateError | BaseExceptionGroup | asyncio.CancelledError):
            _log.error("fatal", error=end[1], exc_info=error)
        report_once(*end)
        return end[0]
    if _failure is not None:
        report_once(*_failure)
        return _failure[0]
    return EXIT_OK


# A child killed by a signal again and again (out of memory at each start) is restarted
# at most this often, so its restarts cannot take the server's CPU.
_RESTART_MAX_SECONDS = 30.0
# A child that lived this long before it was killed is restarted at once.
_RESTART_RESET_SECONDS = 60.0
# How long a child told to stop (or whose part is cancelled) may take before SIGKILL.
_CHILD_STOP_SECONDS = 1.0
_REASON = "reason"
# Sent by a child whose main returned because it was told to stop (a SIGTERM reached it).
_STOPPED = ("stopped",)


@dataclass
class _Said:
    """What a :class:`ChildProcess`'s child sent of its end: its fatal reason, or that it was stopped."""

    reason: str | None = None
    stopped: bool = False


class ChildFailed(SpendgateError):
    """A :class:`ChildProcess` ended by itself; the text is its reason line."""


class ChildProcess:
    """A part of this process that runs in a child process of its own, spawned when :meth:`run` starts.

    The child is ``target(*args, channel)``: ``channel`` is the sending end of a pipe to
    this process; a child started with :func:`run_child` sends its fatal reason there,
    and may send anything else for ``on_message`` (which runs on this event loop).
    How the child ends decides what this part does, as the ``--workers`` supervisor does
    for its workers:

    - killed by a signal (SIGKILL, the OOM killer): it is started again, with one
      warning line ``child_process_died``; the restarts back off (up to 30 s) while it
      keeps dying young;
    - stopped by a SIGTERM this process did not send (exit 0, and :func:`run_child`
      said so): sent to it alone, or to the whole process group (systemd's stop,
      ``timeout``, ``tini -g``), in which case this process is draining and stops the
      part within its drain. So it waits ``stopped_grace_seconds`` for :meth:`stop`; if
      that does not come, it is started again as after a signal;
    - exited with :data:`EXIT_FAILED` or :data:`EXIT_CONFIG`: :meth:`run` raises with
      the child's reason, so the part fails and the process ends with that reason;
    - exited any other way while not asked to stop: the part fails too.

    :meth:`stop` sends SIGTERM to the child's PID and lets :meth:`run` return once it
    has ended; a cancelled :meth:`run` (the process is ending) sends SIGTERM, then
    SIGKILL after a second. The child ends by itself if this process dies
    (:func:`parent_gone`), so it never outlives it.

    Args:
        name: names the child in log lines (``the evaluator``).
        target: the child's entry point (a module-level function: the child is spawned).
        args: its arguments before the channel (picklable).
        on_message: what to do with a message that is not a reason.
        stopped_grace_seconds: how long a child stopped by a SIGTERM of somebody else's
            waits for :meth:`stop` before it is started again (this process's drain, and a
            margin).
    """

    def __init__(
        self,
        name: str,
        target: Callable[..., None],
        args: tuple[Any, ...] = (),
        on_message: Callable[[Any], None] | None = None,
        stopped_grace_seconds: float = 1.0,
    ) -> None:
        self.name = name
        self._stopped_grace_seconds = stopped_grace_seconds
        self._target = target
        self._args = args
        self._on_message = on_message
        # spawn, not fork: gRPC's threads must not be forked.
        self._context = multiprocessing.get_context("spawn")
        self._process: multiprocessing.process.BaseProcess | None = None
        self._stopping = False
        self._stop_requested: asyncio.Event | None = None
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        """The running child's PID (None before it starts and after it ended)."""
        process = self._process
        return process.pid if process is not None and process.exitcode is None else None

    async def run(self) -> None:
        """Run the child until :meth:`stop`, restarting it when a signal kills it.

        Raises:
            ChildFailed: the child exited with a reason (its line, without ``spendgate:``),
                or exited while not asked to stop.
            ConfigError: the child exited with :data:`EXIT_CONFIG` (its reason), so this
                process exits with that code too.
        """
        loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        delay = 0.0
        while not self._stopping:
            started = loop.time()
            exitcode, said = await self._run_once()
            if self._stopping:
                return
            if exitcode == 0 and said.stopped:
                # A SIGTERM not ours: when the whole group got it, this process is draining.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_requested.wait(), self._stopped_grace_seconds)
                if self._stopping:
                    return
                exitcode = -signal.SIGTERM  # restarted as a child killed by it
            elif exitcode >= 0:  # it said why (EXIT_FAILED, EXIT_CONFIG), or ended unasked
                reason = said.reason
                text = reason.removeprefix("spendgate: ") if reason else f"its process exited {exitcode}"
                raise ConfigError(text) if exitcode == EXIT_CONFIG else ChildFailed(text)
            lived = loop.time() - started
            delay = 0.0 if lived >= _RESTART_RESET_SECONDS else min(max(1.0, 2 * delay), _RESTART_MAX_SECONDS)
            self.restarts += 1
            _log.warning(
                "child_process_died",
                child=self.name,
                signal=signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else -exitcode,
                action=f"restarted in {delay:g} s",
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), delay)

    async def _run_once(self) -> tuple[int, _Said]:
        """Start the child and wait for its end; returns its exit code and what it said of its end."""
        receive, send = self._context.Pipe(duplex=False)
        process = self._context.Process(target=self._target, args=(*self._args, send), name=self.name)
        process.start()
        send.close()
        # Held until the child is reaped: the process object keeps open the pipe whose EOF
        # tells the child that this process has died.
        self._process = process
        said = _Said()
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()

        def read() -> None:
            try:
                while receive.poll():
                    self._received(receive.recv(), said)
            except (EOFError, OSError):
                loop.remove_reader(receive.fileno())

        def exited() -> None:
            if not ended.done():
                ended.set_result(None)

        loop.add_reader(receive.fileno(), read)
        loop.add_reader(process.sentinel, exited)
        try:
            await ended
        finally:
            loop.remove_reader(process.sentinel)
            with contextlib.suppress(OSError):
                loop.remove_reader(receive.fileno())
            if process.exitcode is None and not ended.done():
                # Cancelled: the process is ending; the child's batch stays pending, claimed later.
                self._terminate(process)
            process.join()
            with contextlib.suppress(EOFError, OSError):
                while receive.poll():
                    self._received(receive.recv(), said)
            receive.close()
            self._process = None
        assert process.exitcode is not None
        return process.exitcode, said

    def _received(self, message: Any, said: _Said) -> None:
        if isinstance(message, tuple) and len(message) == 3 and message[0] == _REASON:
            said.reason = str(message[2])
        elif message == _STOPPED:
            said.stopped = True
        elif self._on_message is not None:
            self._on_message(message)

    def _terminate(self, process: multiprocessing.process.BaseProcess) -> None:
        assert process.pid is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        process.join(_CHILD_STOP_SECONDS)
        if process.exitcode is None:
            _log.error("child_process_killed", child=self.name, after_seconds=_CHILD_STOP_SECONDS)
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)

    def stop(self) -> None:
        """Send SIGTERM to the child (by PID): it finishes what it is doing; :meth:`run` then returns."""
        self._stopping = True
        if self._stop_requested is not None:
            self._stop_requested.set()
        process = self._process
        if process is not None and process.pid is not None and process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)


def run_child(
    channel: multiprocessing.connection.Connection,
    main: Callable[[], Coroutine[Any, Any, None]],
    niceness: int = 0,
) -> NoReturn:
    """The body of a :class:`ChildProcess`: run ``main()`` with :func:`run_process` and exit with its code.

    ``main`` returns only when told to stop (a SIGTERM), which the parent is told too.
    The fatal reason goes to the parent through ``channel``; SIGINT is ignored (a
    terminal's Ctrl-C reaches the whole process group, and the parent decides when its
    children stop); the child runs ``niceness`` steps nicer than its parent.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A platform that refuses nice() still runs the child, at the parent's priority.
    with contextlib.suppress(OSError):
        os.nice(niceness)

    def report(code: int, line: str) -> None:
        try:
            channel.send((_REASON, code, line))
        except OSError:  # the parent is gone: nobody reads the channel; stderr still does
            _print_line(code, line)

    set_reporter(report)
    code = run_process(main)
    if code == 0:  # main returns only when told to stop
        with contextlib.suppress(OSError):
            channel.send(_STOPPED)
    sys.exit(code)


def parent_gone(on_gone: Callable[[], None]) -> None:
    """Call ``on_gone`` (on this event loop) once the process that spawned this one has ended.

    The parent holds the writing end of a pipe it opened when it spawned this child
    (multiprocessing's parent sentinel); the kernel closes it when the parent ends, even
    by SIGKILL, and the reading end then turns readable. A process not started by
    multiprocessing has nothing to watch.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    loop = asyncio.get_running_loop()
    sentinel = parent.sentinel

    def ended() -> None:
        loop.remove_reader(sentinel)
        _log.warning("parent_process_ended", parent_pid=parent.pid, action="stopping")
        on_gone()

    loop.add_reader(sentinel, ended)
