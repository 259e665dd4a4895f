"""What `spendgate serve` says when it starts, or refuses to: the one reason line, and a true
`serving` line (real processes: the log and the exit code are the process's own)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.processes import STARTUP_SECONDS, free_port, stop_process

DEFAULT_METRICS_PORT = 9464


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "spendgate_server", "serve", "--port", "0", "--log-format", "json", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_no_keys_on_a_public_address_is_one_line_and_no_key_loss_event() -> None:
    """At start-up an empty key table is not a lost one: no `api_keys_missing` (nor any other
    key event) is logged, and stderr carries the one reason line, exit 2."""
    run = serve("--host", "0.0.0.0")  # noqa: S104  # the refusal under test
    assert run.returncode == 2, run.stderr
    assert "api_keys" not in run.stderr
    assert [line for line in run.stderr.splitlines() if line] == [
        "spendgate: --host 0.0.0.0 is reachable from the network and no API keys exist: create one "
        "with 'spendgate keys create', or pass --insecure to serve without authentication"
    ]


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("not-an-ip", "not an IP address or a name this machine resolves"),
        ("999.1.1.1", "not an IP address or a name this machine resolves"),
        # A well-formed address that is not this machine's (TEST-NET-1, RFC 5737).
        ("192.0.2.1", "Cannot assign requested address (not an address of this host)"),
        # Unbalanced brackets: gRPC would print its own parse error and blame the port.
        ("[::1", "brackets must enclose a whole IPv6 address"),
        ("::1]", "brackets must enclose a whole IPv6 address"),
        ("[[::1]]", "brackets must enclose a whole IPv6 address"),
    ],
)
def test_a_host_that_cannot_be_bound_is_refused_as_such(host: str, why: str) -> None:
    """A --host that cannot be bound is refused for that, in one line naming --host, exit 2;
    never as "reachable from the network", whether keys exist or --insecure is given."""
    # The two runs are independent: side by side, as most of each one's time is its start-up.
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda extra: serve("--host", host, *extra), [(), ("--insecure",)]))
    for run in runs:
        lines = [line for line in run.stderr.splitlines() if line and not line.startswith("{")]
        assert run.returncode == 2, run.stderr
        assert len(lines) == 1, run.stderr
        assert lines[0].startswith(f"spendgate: --host {host}: cannot bind: "), lines
        assert why in lines[0] and "reachable" not in lines[0]


def serving_event(argv: list[str], log: Path) -> dict[str, object]:
    """Start ``argv``, return its `serving` log event, and stop it (by its PID)."""
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=sink)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            for line in log.read_text().splitlines():
                if line.startswith("{") and json.loads(line).get("event") == "serving":
                    return dict(json.loads(line))
            assert process.poll() is None, log.read_text()
            time.sleep(0.05)
        pytest.fail(f"no serving line:\n{log.read_text()}")
    finally:
        stop_process(process)


def test_the_serving_line_reports_the_metrics_port_actually_served(tmp_path: Path) -> None:
    """The default metrics port taken: metrics are off and `serving` says metrics_port 0, not
    9464; a free port given by flag is served and reported as itself."""
    # No drain on SIGTERM (5 s by default): how the servers stop is not what is checked here.
    argv = [sys.executable, "-m", "spendgate_server", "serve", "--port", "0", "--log-format", "json"]
    argv += ["--drain-seconds", "0"]
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    with contextlib.suppress(OSError):  # already held by another process: taken all the same
        holder.bind(("127.0.0.1", DEFAULT_METRICS_PORT))
        holder.listen()
    port = free_port()
    # Three independent servers, started side by side (none of the other two uses the default port).
    with holder, ThreadPoolExecutor(3) as pool:
        taken_run = pool.submit(serving_event, argv, tmp_path / "taken.log")
        named_run = pool.submit(serving_event, [*argv, "--metrics-port", str(port)], tmp_path / "named.log")
        off_run = pool.submit(serving_event, [*argv, "--metrics-port", "0"], tmp_path / "off.log")
        taken, served, off = taken_run.result(), named_run.result(), off_run.result()
    assert taken["metrics_port"] == 0
    assert "metrics_off" in (tmp_path / "taken.log").read_text()
    assert served["metrics_port"] == port
    assert off["metrics_port"] == 0


@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_an_ipv6_loopback_host_serves_written_either_way(host: str, tmp_path: Path) -> None:
    """``--host ::1`` is bracketed for gRPC as ``[::1]`` is: it serves, metrics too, no gRPC error line."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    import grpc
    from spendgate.v1 import decision_pb2 as pb
    from spendgate.v1 import decision_pb2_grpc

    metrics_port = free_port()
    log = tmp_path / "server.log"
    argv = [
        *(sys.executable, "-m", "spendgate_server", "serve", "--port", "0", "--log-format", "json"),
        *("--host", host, "--metrics-port", str(metrics_port), "--drain-seconds", "0"),
    ]
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=sink)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not (
            serving := [e for e in map(json.loads, log.read_text().splitlines()) if e["event"] == "serving"]
        ):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)  # polls a real process's log
        with grpc.insecure_channel(f"[::1]:{serving[0]['port']}") as channel:
            answer = decision_pb2_grpc.DecisionServiceStub(channel).Decide(
                pb.DecideRequest(session_id="v6", model="claude-sonnet-4-5", fingerprint=b"6" * 32),
                timeout=10,
            )
        assert answer.verdict == pb.VERDICT_ALLOW
        with socket.create_connection(("::1", metrics_port), timeout=5):
            pass  # the metrics endpoint listens on the same address
    finally:
        stop_process(process)
    # Every line is a JSON event (json.loads above would have failed on gRPC's own error line).
    assert all(line.startswith("{") for line in log.read_text().splitlines())
