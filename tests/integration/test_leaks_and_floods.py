"""Leaks and log floods: no Redis password in any output; unknown model names warned once each.

Real processes: the spendgate CLI and servers in subprocesses, a real redis-server with an
ACL user, so the password is real and used, and is then looked for in every byte written.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import decision_pb2_grpc
from spendgate_client import DecisionClient
from spendgate_server.logging import redact_secrets

from tests.processes import RedisServer, SpendgateServer, free_port, scrape_metrics

PASSWORD = "s3cret-Pa55word"  # noqa: S105  # a test password, looked for in every output
POLL_SECONDS = 15.0


def spendgate_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spendgate_server", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "url",
    [
        f"redis://app:{PASSWORD}@127.0.0.1:{{port}}/0",
        f"redis://:{PASSWORD}@127.0.0.1:{{port}}/0",
        f"rediss://app:{PASSWORD}@127.0.0.1:{{port}}/0",
        f"redis://127.0.0.1:{{port}}/0?password={PASSWORD}",
        f"redis+cluster://app:{PASSWORD}@127.0.0.1:{{port}},127.0.0.1:{{port}}",
        f"redis://app:{PASSWORD}@[not-a-host/0",
    ],
)
def test_unreachable_or_bad_redis_url_never_prints_the_password(url: str) -> None:
    """serve, worker and keys: one line naming the redacted URL (or the store), never the password."""
    url = url.format(port=free_port())
    commands = [
        ("serve", "--store", "redis", "--redis-url", url, "--port", "0", "--metrics-port", "0"),
        ("worker", "--store", "redis", "--redis-url", url, "--metrics-port", "0"),
        ("keys", "list", "--redis-url", url),
    ]
    # Three independent processes, run side by side: most of each one's time is its start-up.
    with ThreadPoolExecutor(len(commands)) as pool:
        results = list(pool.map(lambda args: spendgate_cli(*args), commands))
    for result in results:
        assert result.returncode in (1, 2), result
        output = result.stdout + result.stderr
        assert PASSWORD not in output, output
        assert "Traceback" not in output and len(result.stderr.strip().splitlines()) == 1, output


@pytest.mark.redis
def test_a_running_server_never_logs_the_password(spendgate: Callable[..., SpendgateServer]) -> None:
    """A server on a Redis ACL user serves, loses Redis and recovers: its whole log holds no password."""
    redis_server = RedisServer.start("--user", "app", "on", f">{PASSWORD}", "~*", "&*", "+@all")
    url = f"redis://app:{PASSWORD}@127.0.0.1:{redis_server.port}/0"
    try:
        server = spendgate(
            *("--store", "redis", "--redis-url", url, "--health-interval-millis", "50"),
            *("--redis-timeout-millis", "200", "--redis-breaker-failures", "1"),
        )
        with DecisionClient(server.target, timeout=5, fail_mode="closed") as client:
            assert client.decide("s", "claude-sonnet-4-5", 10, 10, b"a" * 32).allowed
        redis_server.stop()
        deadline = time.monotonic() + POLL_SECONDS
        while not any(e.get("event") == "store_unreachable" for e in server.log_events()):
            assert time.monotonic() < deadline, "the server never noticed Redis was gone"
            time.sleep(0.05)
        with DecisionClient(server.target, timeout=5, fail_mode="open") as client:
            client.decide("s", "claude-sonnet-4-5", 10, 10, b"b" * 32)
        server.stop()
        log = server.log_path.read_text()
        assert "store_unreachable" in log and PASSWORD not in log
    finally:
        redis_server.stop()


def test_redaction_covers_every_url_shape() -> None:
    """Userinfo (a raw "@" in a password included) and credential query values become ***."""
    cases = {
        f"redis://app:{PASSWORD}@h:1/0": "redis://***@h:1/0",
        f"rediss://:{PASSWORD}@h:1/0": "rediss://***@h:1/0",
        f"redis://app:pa@ss{PASSWORD}@h:1/0 and more": "redis://***@h:1/0 and more",
        f"redis+cluster://app:{PASSWORD}@h:1,h:2": "redis+cluster://***@h:1,h:2",
        f"redis://h:1/0?db=2&password={PASSWORD}&x=1": "redis://h:1/0?db=2&password=***&x=1",
        f"https://hook:{PASSWORD}@example.com/path?token={PASSWORD}": "https://***@example.com/path?token=***",
        "redis://h:1/0 reached by ops@example.com": "redis://h:1/0 reached by ops@example.com",
        "plain text": "plain text",
    }
    for text, redacted in cases.items():
        assert redact_secrets(text) == redacted


def test_six_thousand_unknown_models_warn_at_most_once_each(
    spendgate: Callable[..., SpendgateServer],
) -> None:
    """6,000 unknown names, each decided twice (past the price cache): a warning at most once a name."""
    metrics_port = free_port()
    server = spendgate("--metrics-port", str(metrics_port))
    names = [f"no-such-model-{i}" for i in range(6000)]
    with grpc.insecure_channel(server.target) as channel:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)
        for round_ in range(2):
            # Bursts of 100: one connection carries at most --max-in-flight plus the watch
            # streams at once (README, Overload); past that gRPC refuses the extra streams.
            for start in range(0, len(names), 100):
                futures = [
                    stub.Decide.future(
                        pb.DecideRequest(
                            session_id=f"s{round_}",
                            model=name,
                            input_tokens=1,
                            max_output_tokens=1,
                            fingerprint=hashlib.sha256(f"{round_}{name}".encode()).digest(),
                        ),
                        timeout=60,
                    )
                    for name in names[start : start + 100]
                ]
                assert all(f.result().verdict == pb.VERDICT_ALLOW for f in futures)
    warned = [
        str(e["model"])
        for e in server.log_events()
        if e.get("event") == "unknown_price" and e.get("kind") == "model"
    ]
    # Each name at most once (the reported names are bounded: 4,096 per process), however often sent.
    assert len(warned) == len(set(warned)) and 4096 <= len(warned) <= len(names)
    assert set(warned) <= set(names)
    # Every call is counted, logged or not.
    assert scrape_metrics(metrics_port)['spendgate_unpriced_total{kind="model"}'] >= 2 * len(names)
