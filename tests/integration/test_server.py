"""The real server over a real socket: rules end to end, rich errors on bad input, the CLI."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import decision_pb2_grpc

from tests.processes import SpendgateServer, free_port

CONFIG = """
enforcement:
  token_ceiling: 8000
  max_session_usd: 0.01
  dedup_ttl_seconds: 60
  max_tool_calls: 3
  model_downgrade: {threshold_usd: 0.004, fallback: small}
prices:
  big: {input_usd_per_mtok: 1, output_usd_per_mtok: 2}
  small: {input_usd_per_mtok: 0.1, output_usd_per_mtok: 0.2}
"""


@pytest.fixture
def server(spendgate: Callable[..., SpendgateServer], tmp_path: Path) -> SpendgateServer:
    config = tmp_path / "spendgate.yaml"
    config.write_text(CONFIG)
    return spendgate("--config", str(config))


@pytest.fixture
def stub(server: SpendgateServer) -> Iterator[decision_pb2_grpc.DecisionServiceStub]:
    channel = grpc.insecure_channel(server.target)
    yield decision_pb2_grpc.DecisionServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def refusals_stub(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[decision_pb2_grpc.DecisionServiceStub]:
    """One server for the module's tests of refused calls: a refusal changes no state, and what
    they do decide goes to a session of their own."""
    config = tmp_path_factory.mktemp("refusals") / "spendgate.yaml"
    config.write_text(CONFIG)
    server = SpendgateServer.start("--config", str(config))
    channel = grpc.insecure_channel(server.target)
    yield decision_pb2_grpc.DecisionServiceStub(channel)
    channel.close()
    server.stop()


def request(session: str = "s1", prompt: str = "p", **fields: Any) -> pb.DecideRequest:
    defaults: dict[str, Any] = {
        "session_id": session,
        "model": "big",
        "input_tokens": 1000,
        "max_output_tokens": 500,
        "fingerprint": hashlib.sha256(prompt.encode()).digest(),
    }
    return pb.DecideRequest(**{**defaults, **fields})


def bad_fields(error: grpc.RpcError) -> list[str]:
    """The fields named by the BadRequest detail of an INVALID_ARGUMENT error."""
    for key, value in cast("Sequence[tuple[str, bytes]]", error.trailing_metadata()):
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    return [v.field for v in bad.field_violations]
    return []


def test_each_rule_fires_through_the_server(stub: decision_pb2_grpc.DecisionServiceStub) -> None:
    """Ceiling, dedup, tool limit, downgrade and budget each decide over a real socket."""
    allowed = stub.Decide(request(prompt="a"))
    assert (allowed.verdict, allowed.effective_model) == (pb.VERDICT_ALLOW, "big")
    assert allowed.estimated_cost_nano_usd == 1000 * 1000 + 500 * 2000

    ceiling = stub.Decide(request(prompt="b", input_tokens=8001))
    assert (ceiling.verdict, ceiling.rule) == (pb.VERDICT_BLOCK, pb.RULE_TOKEN_CEILING)

    dup = stub.Decide(request(prompt="a"))
    assert (dup.verdict, dup.rule) == (pb.VERDICT_BLOCK, pb.RULE_DUPLICATE_REQUEST)

    tools = stub.Decide(request(prompt="c", tool_call_count=4))
    assert (tools.verdict, tools.rule) == (pb.VERDICT_BLOCK, pb.RULE_TOOL_CALL_LIMIT)

    downgraded = stub.Decide(request(prompt="d", input_tokens=3000, max_output_tokens=1000))
    assert (downgraded.verdict, downgraded.effective_model) == (
        pb.VERDICT_ALLOW_DOWNGRADED,
        "small",
    )

    for i in range(20):
        last = stub.Decide(request(prompt=f"e{i}"))
        if last.verdict == pb.VERDICT_BLOCK:
            break
    assert (last.verdict, last.rule) == (pb.VERDICT_BLOCK, pb.RULE_SESSION_BUDGET)
    assert last.HasField("remaining_budget_nano_usd") and last.remaining_budget_nano_usd == 0


def test_client_config_tightens_server_config(stub: decision_pb2_grpc.DecisionServiceStub) -> None:
    """A client's enforcement_config can lower the ceiling but not raise it."""
    tighter = stub.Decide(
        request(prompt="x", input_tokens=600, enforcement_config=pb.EnforcementConfig(token_ceiling=500))
    )
    looser = stub.Decide(
        request(
            prompt="y",
            input_tokens=9000,
            enforcement_config=pb.EnforcementConfig(token_ceiling=50_000),
        )
    )
    assert tighter.rule == looser.rule == pb.RULE_TOKEN_CEILING


def test_settle_is_idempotent_over_the_wire(stub: decision_pb2_grpc.DecisionServiceStub) -> None:
    """Settling twice counts once, and reports the repeat."""
    decision = stub.Decide(request())
    settle = pb.SettleRequest(
        session_id="s1",
        reservation_id=decision.reservation_id,
        model="big",
        usage=pb.Usage(input_tokens=1000, output_tokens=100),
        outcome=pb.PROVIDER_OUTCOME_OK,
    )
    first, second = stub.Settle(settle), stub.Settle(settle)
    assert first.actual_cost_nano_usd == 1000 * 1000 + 100 * 2000
    assert (first.already_settled, second.already_settled) == (False, True)
    assert second.session_spend_nano_usd == first.session_spend_nano_usd


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"session_id": ""}, "session_id"),
        ({"session_id": "x" * 129}, "session_id"),
        ({"session_id": "{brace}"}, "session_id"),
        ({"input_tokens": -1}, "input_tokens"),
        ({"max_output_tokens": -5}, "max_output_tokens"),
        ({"fingerprint": b"short"}, "fingerprint"),
        ({"fingerprint": b""}, "fingerprint"),
        ({"model": ""}, "model"),
        ({"tool_call_count": -2}, "tool_call_count"),
        ({"request_id": "has space"}, "request_id"),
        (
            {"enforcement_config": pb.EnforcementConfig(budget_mode=cast(Any, 99))},
            "enforcement_config.budget_mode",
        ),
        (
            {"enforcement_config": pb.EnforcementConfig(shadow_rules=cast(Any, [42]))},
            "enforcement_config.shadow_rules[0]",
        ),
        (
            {"enforcement_config": pb.EnforcementConfig(token_ceiling=0)},
            "enforcement_config.token_ceiling",
        ),
    ],
)
def test_bad_input_names_the_field(
    refusals_stub: decision_pb2_grpc.DecisionServiceStub,
    fields: dict[str, Any],
    expected: str,
) -> None:
    """Each malformed field gets INVALID_ARGUMENT with a BadRequest naming it; the server keeps serving."""
    with pytest.raises(grpc.RpcError) as info:
        refusals_stub.Decide(request(**fields))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert expected in bad_fields(info.value)
    # A session of this case's own on the shared server (its budget and dedup window are fresh).
    after = f"after-bad-input-{uuid.uuid4().hex}"
    assert refusals_stub.Decide(request(session=after)).verdict == pb.VERDICT_ALLOW


def test_bad_settle_names_the_field(refusals_stub: decision_pb2_grpc.DecisionServiceStub) -> None:
    """Settle validates too: a malformed reservation id and an unspecified outcome are named."""
    with pytest.raises(grpc.RpcError) as info:
        refusals_stub.Settle(pb.SettleRequest(session_id="s1", reservation_id="nope", model="big"))
    assert {"reservation_id", "outcome"} <= set(bad_fields(info.value))


def test_unknown_reservation_is_not_found(refusals_stub: decision_pb2_grpc.DecisionServiceStub) -> None:
    """Settling a reservation that does not exist is NOT_FOUND."""
    with pytest.raises(grpc.RpcError) as info:
        refusals_stub.Settle(
            pb.SettleRequest(
                session_id="s1",
                reservation_id="0" * 32,
                model="big",
                outcome=pb.PROVIDER_OUTCOME_OK,
            )
        )
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


def test_oversized_message_is_refused(refusals_stub: decision_pb2_grpc.DecisionServiceStub) -> None:
    """A request above the server's message size limit is refused before any work."""
    with pytest.raises(grpc.RpcError) as info:
        refusals_stub.Decide(request(request_id="x" * 100_000))
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def spendgate_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spendgate_server", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_decide_shows_block_with_exit_code(server: SpendgateServer) -> None:
    """`spendgate decide` prints the verdict and exits 3 on a block."""
    allowed = spendgate_cli("decide", "--target", server.target, "--session", "cli", "--model", "big")
    blocked = spendgate_cli(
        "decide",
        "--target",
        server.target,
        "--session",
        "cli",
        "--model",
        "big",
        "--input-tokens",
        "9000",
    )
    assert allowed.returncode == 0 and allowed.stdout.startswith("ALLOW")
    assert blocked.returncode == 3 and "token_ceiling" in blocked.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--store", "mongo"], "--store"),
        (["serve", "--workers", "2"], "--workers above 1 needs --store redis"),
        (["serve", "--port", "http"], "--port"),
        (["serve", "--config", "/nonexistent/spendgate.yaml"], "--config"),
    ],
)
def test_cli_bad_flags_give_one_clear_line(args: list[str], message: str) -> None:
    """A bad flag is one line on stderr naming it, exit 2, no traceback."""
    result = spendgate_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_unreachable_redis_is_one_line() -> None:
    """An unreachable Redis at start-up is one clear line and a non-zero exit."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    result = spendgate_cli("serve", "--port", "0", "--store", "redis", "--redis-url", url)
    assert result.returncode == 2
    assert "unreachable" in result.stderr and "Traceback" not in result.stderr


def test_cli_bad_config_names_the_key(tmp_path: Path) -> None:
    """A config file with a bad rule value names the key and refuses to start."""
    config = tmp_path / "bad.yaml"
    config.write_text("enforcement:\n  token_ceiling: -3\n  max_sesion_usd: 5\n")
    result = spendgate_cli("serve", "--config", str(config))
    assert result.returncode == 2
    assert "enforcement.token_ceiling" in result.stderr and "enforcement.max_sesion_usd" in result.stderr


def test_cli_decide_unreachable_server() -> None:
    """`spendgate decide` against nothing says it cannot reach it, in one line."""
    result = spendgate_cli(
        "decide",
        "--target",
        f"127.0.0.1:{free_port()}",
        "--session",
        "s",
        "--model",
        "big",
        "--timeout",
        "0.5",
    )
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert "cannot reach spendgate at" in result.stderr or "no answer from" in result.stderr
