"""Real processes for tests: redis-server and spendgate servers on free ports, stopped by PID."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

STARTUP_SECONDS = 20.0


def free_port() -> int:
    """A TCP port nobody listens on right now (bind port 0 and read it back)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process we started, then SIGKILL if it lingers."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class RedisServer:
    """A private redis-server on a free port."""

    port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    extra_args: Sequence[str] = ()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, *extra_args: str, port: int | None = None, workdir: Path | None = None) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; run 'make test' (it installs it)")
        port = port or free_port()
        workdir = workdir or Path(tempfile.mkdtemp(prefix="sg-redis-"))
        args = [
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
            *extra_args,
        ]
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server = cls(port, process, workdir, extra_args)
        server.wait_ready()
        return server

    def wait_ready(self) -> None:
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            try:
                client.ping()
                client.close()
                return
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.02)

    def stop(self) -> None:
        stop_process(self.process)


@dataclass
class SpendgateServer:
    """A ``spendgate serve`` process; ``target`` is its host:port."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def start(cls, *args: str, port: int = 0, env: dict[str, str] | None = None) -> SpendgateServer:
        log = Path(tempfile.mkstemp(prefix="sg-server-", suffix=".log")[1])
        # Metrics are off unless a test asks for them, so parallel servers never clash on a port.
        defaults = [] if "--metrics-port" in args else ["--metrics-port", "0"]
        argv = [
            *(sys.executable, "-m", "spendgate_server", "serve", "--port", str(port)),
            *("--log-format", "json", "--drain-seconds", "0", *defaults, *args),
        ]
        with log.open("wb") as sink:
            process = subprocess.Popen(argv, stdout=sink, stderr=sink, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            for line in log.read_text().splitlines():
                if line.startswith("{") and json.loads(line).get("event") == "serving":
                    bound = json.loads(line)["port"]
                    if port == 0 or bound == port:
                        return cls(process, bound, log, argv)
            if process.poll() is not None:
                raise RuntimeError(f"spendgate exited {process.returncode}:\n{log.read_text()}")
            time.sleep(0.05)
        stop_process(process)
        raise RuntimeError(f"spendgate did not report serving:\n{log.read_text()}")

    def log_events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]

    def stop(self) -> None:
        stop_process(self.process)
