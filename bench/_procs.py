"""Processes the benchmark starts: redis-server, the floor, spendgate; stopped by PID, always.

Every process goes into a ``Processes`` registry that stops them (SIGTERM, then
SIGKILL) on exit, on an exception and on SIGTERM/SIGINT of the benchmark itself.
CPU time is read from /proc/<pid>/stat (utime + stime) of a process and its
descendants, so ``--workers`` children are counted too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType

import redis

__all__ = ["Processes", "Served", "cpu_seconds", "descendants", "free_port"]

STARTUP_SECONDS = 30.0
_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port nobody listens on right now (bind port 0 and read it back)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _own_cpu_seconds(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # Fields after the command name (which may contain spaces); utime and stime are 14 and 15.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def descendants(pid: int) -> list[int]:
    """``pid``'s children, grandchildren, …, read from /proc (Linux)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = [int(c) for c in (task / "children").read_text().split()]
                found.extend(children)
                stack.extend(children)
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and of its live descendants, in seconds."""
    return sum(_own_cpu_seconds(p) for p in [pid, *descendants(pid)])


@dataclass
class Served:
    """A started server process: what it is, where it listens, how to reach its CPU time."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    argv: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        """host:port of the server."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """PID of the process we started (a ``--workers`` parent counts its children in)."""
        return self.process.pid

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the process and its workers."""
        return cpu_seconds(self.pid)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of its log, for error messages."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Processes:
    """Registry of every process the benchmark starts; a context manager that stops them all."""

    def __init__(self) -> None:
        self._started: list[Served] = []
        self._tmp = Path(tempfile.mkdtemp(prefix="sg-bench-"))
        self._previous: dict[int, object] = {}

    @property
    def tmp(self) -> Path:
        """A private scratch directory, removed on exit."""
        return self._tmp

    def __enter__(self) -> Processes:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]  # what signal.signal returned
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    def stop_all(self) -> None:
        """Stop every started process, newest first."""
        while self._started:
            self.stop(self._started[-1])

    def stop(self, served: Served, timeout: float = 10.0) -> None:
        """SIGTERM the process (and then its leftover workers), SIGKILL whatever lingers."""
        if served in self._started:
            self._started.remove(served)
        process = served.process
        children = descendants(process.pid) if process.poll() is None else []
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for child in children:
            # Only PIDs read as our process's children a moment ago; gone ones raise.
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)

    def _popen(
        self, name: str, argv: Sequence[str], env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen[bytes], Path]:
        log = self._tmp / f"{name}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                list(argv),
                stdout=sink,
                stderr=sink,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
            )
        return process, log

    def start_redis(self) -> Served:
        """A private redis-server on a free port, no persistence."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
        port = free_port()
        workdir = self._tmp / "redis"
        workdir.mkdir()
        argv = [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ]
        process, log = self._popen("redis", argv)
        served = Served("redis", process, port, log, argv)
        self._started.append(served)
        client = redis.Redis(port=port, socket_timeout=1)
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            try:
                client.ping()
                client.close()
                return served
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start:\n{served.log_tail()}") from None
                time.sleep(0.02)

    def start_server(
        self,
        name: str,
        argv: Sequence[str],
        *,
        port: int = 0,
        ready_lines: int = 1,
        env: dict[str, str] | None = None,
    ) -> Served:
        """Start a server that logs a JSON ``{"event": "serving", "port": N}`` line per process.

        Args:
            name: label for logs and errors.
            argv: the command.
            port: the fixed port it was told, or 0 to read it back from the log.
            ready_lines: how many "serving" lines mean ready (one per ``--workers`` process).
            env: extra environment variables.
        """
        process, log = self._popen(name, argv, env)
        served = Served(name, process, port, log, list(argv))
        self._started.append(served)
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            ports = []
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        event = json.loads(line)
                        if event.get("event") == "serving":
                            ports.append(int(event["port"]))
            if len(ports) >= ready_lines:
                served.port = ports[0]
                return served
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited {process.returncode}:\n{served.log_tail()}")
            time.sleep(0.05)
        raise RuntimeError(f"{name} did not report serving in {STARTUP_SECONDS}s:\n{served.log_tail()}")


def python_module(module: str, *args: str) -> list[str]:
    """argv running ``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


@contextlib.contextmanager
def running() -> Iterator[Processes]:
    """``with running() as procs:`` — every process started through ``procs`` is stopped at the end."""
    with Processes() as procs:
        yield procs
