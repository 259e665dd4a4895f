"""Several servers on one host: the README's example as printed, the default metrics port shared,
and violations found by the servers themselves."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from spendgate_client import DecisionClient

from tests.processes import RedisServer, SpendgateServer, free_port, stop_process, stop_processes

ROOT = Path(__file__).parents[2]
DEFAULT_METRICS_PORT = 9464
POLL_SECONDS = 20.0


def readme_block(heading: str) -> list[str]:
    """The commands of the first ```sh block (attributes may follow ``sh``) after ``heading``."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```sh[^\n]*\n(.*?)```", text[text.index(heading) :], re.DOTALL)
    assert block is not None, heading
    return [line for line in block.group(1).splitlines() if line.strip()]


def log_events(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def wait_serving(process: subprocess.Popen[bytes], log: Path) -> int:
    """The gRPC port once the process logs ``serving``."""
    deadline = time.monotonic() + POLL_SECONDS
    while True:
        for event in log_events(log):
            if event.get("event") == "serving":
                return int(str(event["port"]))
        assert process.poll() is None, f"exited {process.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


@contextlib.contextmanager
def default_metrics_port_taken() -> Iterator[None]:
    """The default metrics port is held (by us, unless another process on the host already holds it)."""
    holder = socket.socket()
    # As the metrics server binds: a port left in TIME_WAIT by an earlier test is not taken.
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        with contextlib.suppress(OSError):
            holder.bind(("127.0.0.1", DEFAULT_METRICS_PORT))
            holder.listen()
        yield
    finally:
        holder.close()


def spendgate_argv(command: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "spendgate_server", command, *args]


@pytest.mark.redis
def test_the_readme_two_server_example_runs_as_printed(tmp_path: Path) -> None:
    """The README's Redis and two servers start with every default (the second finds the default
    metrics port taken: one warning, and it serves), and both decide on one shared state.

    Only the three ports are moved to free ones, as other processes on a test machine may hold them.
    """
    commands = readme_block("### Shared state: Redis and several servers")
    assert len(commands) == 3 and all(line.endswith(" &") for line in commands), commands
    ports = {"6379": str(free_port()), "50051": str(free_port()), "50052": str(free_port())}
    processes: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for index, line in enumerate(commands):
            argv = shlex.split(re.sub(r"\b(6379|50051|50052)\b", lambda m: ports[m.group(1)], line[:-2]))
            if argv[0] == ".venv/bin/spendgate":
                argv[0] = str(ROOT / ".venv" / "bin" / "spendgate")
            log = tmp_path / f"process-{index}.log"
            with log.open("wb") as sink:
                # In tmp_path: redis-server as printed writes its snapshot to the working directory.
                processes.append((subprocess.Popen(argv, cwd=tmp_path, stdout=sink, stderr=sink), log))
            if index == 0:
                RedisServer(int(ports["6379"]), processes[0][0], tmp_path).wait_ready()
            else:
                # One at a time, as a shell running the block would usually start them.
                wait_serving(*processes[-1])
        servers = processes[1:]
        targets = [f"127.0.0.1:{wait_serving(*server)}" for server in servers]
        fingerprint = hashlib.sha256(b"the same request").digest()
        config = {"dedup_ttl_seconds": 60}
        with DecisionClient(targets[0], timeout=5) as first, DecisionClient(targets[1], timeout=5) as second:
            assert first.decide(
                "readme", "claude-sonnet-4-5", 10, 10, fingerprint, enforcement_config=config
            ).allowed
            repeat = second.decide(
                "readme", "claude-sonnet-4-5", 10, 10, fingerprint, enforcement_config=config
            )
            assert not repeat.allowed, "the second server does not see the first one's state"
        warned = [any(event.get("event") == "metrics_off" for event in log_events(log)) for _, log in servers]
        # At most one server can hold the default port; every other one said so.
        assert warned.count(False) <= 1, warned
        if warned == [False, True]:
            body = urllib.request.urlopen(
                f"http://127.0.0.1:{DEFAULT_METRICS_PORT}/metrics", timeout=5
            ).read()
            assert b"spendgate_decisions_total" in body
        for _, log in servers:
            stray = [line for line in log.read_text().splitlines() if line and not line.startswith("{")]
            assert not stray, stray
    finally:
        # The servers drain (the README's default, 5 s) side by side, then Redis stops.
        stop_processes([process for process, _ in processes[1:]])
        for process, _ in processes[:1]:
            stop_process(process)


@pytest.mark.redis
def test_the_default_metrics_port_taken_is_a_warning_and_a_named_one_an_error(
    redis_url: str, tmp_path: Path
) -> None:
    """serve and worker on a taken default metrics port warn once and run; the same port named by
    flag or variable refuses to start, exit 2, in one line."""
    redis_args = ("--store", "redis", "--redis-url", redis_url, "--log-format", "json")
    with default_metrics_port_taken():
        log = tmp_path / "serve.log"
        with log.open("wb") as sink:
            # No drain on SIGTERM (5 s by default): the stop is not what is checked here.
            serve_argv = spendgate_argv("serve", "--port", "0", "--drain-seconds", "0", *redis_args)
            serve = subprocess.Popen(serve_argv, stderr=sink)
        try:
            wait_serving(serve, log)
            assert [e["event"] for e in log_events(log)].count("metrics_off") == 1
        finally:
            stop_process(serve)
        assert serve.returncode == 0
        worker_log = tmp_path / "worker.log"
        with worker_log.open("wb") as sink:
            worker = subprocess.Popen(spendgate_argv("worker", *redis_args), stderr=sink)
        try:
            deadline = time.monotonic() + POLL_SECONDS
            while "worker_ready" not in [e["event"] for e in log_events(worker_log)]:
                assert worker.poll() is None and time.monotonic() < deadline, worker_log.read_text()
                time.sleep(0.05)
            assert [e["event"] for e in log_events(worker_log)].count("metrics_off") == 1
        finally:
            stop_process(worker)
        named = [
            (
                spendgate_argv(
                    "serve", "--port", "0", "--metrics-port", str(DEFAULT_METRICS_PORT), *redis_args
                ),
                {},
            ),
            (spendgate_argv("serve", "--port", "0", *redis_args), {"SPENDGATE_METRICS_PORT": "9464"}),
            (spendgate_argv("worker", "--metrics-port", str(DEFAULT_METRICS_PORT), *redis_args), {}),
        ]
        for argv, env in named:
            refused = subprocess.run(
                argv, capture_output=True, text=True, timeout=60, check=False, env={**os.environ, **env}
            )
            lines = [line for line in refused.stderr.splitlines() if not line.startswith("{")]
            assert refused.returncode == 2, refused.stderr
            assert lines == [
                f"spendgate: --metrics-port {DEFAULT_METRICS_PORT}: cannot bind 127.0.0.1: "
                "Address already in use"
            ], refused.stderr


@pytest.mark.redis
def test_violations_appear_in_redis_mode_with_the_defaults(redis_url: str, tmp_path: Path) -> None:
    """A Redis-store `spendgate serve` with no evaluator flag evaluates: a call against the policies
    shows up in `spendgate violations list`, all through the CLI as the README documents it."""
    server = SpendgateServer.start("--store", "redis", "--redis-url", redis_url)
    try:
        target = ("--target", server.target)
        policies = tmp_path / "policies.yaml"
        policies.write_text("approved_models: [claude-haiku-4-5]\n")
        assert cli("policies", "set", str(policies), *target).returncode == 0
        decided = cli("decide", "--session", "audit", "--model", "claude-sonnet-4-5", "--json", *target)
        assert decided.returncode == 0, decided.stderr
        reservation = json.loads(decided.stdout)["reservation_id"]
        settled = cli(
            "settle", "--session", "audit", "--reservation", reservation, "--model", "claude-sonnet-4-5",
            "--input-tokens", "100", "--output-tokens", "10", *target,
        )  # fmt: skip
        assert settled.returncode == 0, settled.stderr
        deadline = time.monotonic() + POLL_SECONDS
        while "session=audit" not in (listed := cli("violations", "list", *target)).stdout:
            assert time.monotonic() < deadline, f"no violation listed: {listed.stdout} {listed.stderr}"
            time.sleep(0.1)
        (line,) = listed.stdout.splitlines()
        assert "approved_models" in line and "claude-sonnet-4-5" in line
    finally:
        stop_process(server.process)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(spendgate_argv(*args), capture_output=True, text=True, timeout=60, check=False)
