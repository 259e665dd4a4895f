"""Block reasons over the real server: settled spend and in-flight reservations are told apart."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import decision_pb2_grpc
from spendgate_client import DecisionClient

from tests.processes import SpendgateServer

# $1 and $2 per million tokens: 1,000 and 2,000 nano-USD a token.
CONFIG = """
prices:
  big: {input_usd_per_mtok: 1, output_usd_per_mtok: 2}
"""
CAP = {"max_session_usd": 0.005}


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def target(spendgate: Callable[..., SpendgateServer], tmp_path: Path, request: pytest.FixtureRequest) -> str:
    config = tmp_path / "spendgate.yaml"
    config.write_text(CONFIG)
    args = ["--config", str(config)]
    if request.param == "redis":
        args += ["--store", "redis", "--redis-url", request.getfixturevalue("redis_url")]
    return spendgate(*args).target


def decide(
    stub: decision_pb2_grpc.DecisionServiceStub, prompt: str, tokens: tuple[int, int]
) -> pb.DecideResponse:
    response: pb.DecideResponse = stub.Decide(
        pb.DecideRequest(
            session_id="agent-1",
            model="big",
            input_tokens=tokens[0],
            max_output_tokens=tokens[1],
            fingerprint=hashlib.sha256(prompt.encode()).digest(),
            enforcement_config=pb.EnforcementConfig(max_session_nano_usd=5_000_000),
        ),
        timeout=5,
    )
    return response


def test_open_reservation_block_says_reserved_and_lifts_after_settle(target: str) -> None:
    """Cap $0.005, one open $0.015 reservation: blocked as reserved; settled at $0.0016, calls pass."""
    with grpc.insecure_channel(target) as channel, DecisionClient(target, timeout=5) as client:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)
        first = decide(stub, "first", (5_000, 5_000))
        assert (first.verdict, first.reserved_nano_usd, first.settled_spend_nano_usd) == (
            pb.VERDICT_ALLOW,
            15_000_000,
            0,
        )
        # The second block is answered by the server's deny cache; it must say the same.
        for prompt in ("second", "third"):
            blocked = decide(stub, prompt, (100, 100))
            assert (blocked.verdict, blocked.rule) == (pb.VERDICT_BLOCK, pb.RULE_SESSION_BUDGET)
            assert (blocked.settled_spend_nano_usd, blocked.reserved_nano_usd) == (0, 15_000_000)
            assert blocked.session_spend_nano_usd == 15_000_000 and blocked.unblocks_on_settle
            assert "$0.015 reserved by calls in flight" in blocked.reason
            assert "new session" not in blocked.reason

        settled = client.settle("agent-1", first.reservation_id, "big", input_tokens=1_000, output_tokens=300)
        assert settled is not None and settled.cost_nano_usd == 1_600_000

        later = decide(stub, "fourth", (100, 100))
        assert (later.verdict, later.settled_spend_nano_usd, later.reserved_nano_usd) == (
            pb.VERDICT_ALLOW,
            1_600_000,
            300_000,
        )


def test_settled_spend_block_says_start_a_new_session(target: str) -> None:
    """Once settled spend alone reached the cap, the block says to start a new session and cannot lift."""
    with grpc.insecure_channel(target) as channel, DecisionClient(target, timeout=5) as client:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)
        first = decide(stub, "first", (5_000, 5_000))
        client.settle("agent-1", first.reservation_id, "big", input_tokens=5_000, output_tokens=1_000)
        blocked = decide(stub, "second", (100, 100))
        assert (blocked.settled_spend_nano_usd, blocked.reserved_nano_usd, blocked.unblocks_on_settle) == (
            7_000_000,
            0,
            False,
        )
        assert (
            blocked.reason
            == "session spend $0.007 has reached max_session_usd $0.005; start a new session id"
        )
