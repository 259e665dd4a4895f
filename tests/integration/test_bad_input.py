"""Bad input from the adversarial round: each gets a clear INVALID_ARGUMENT naming the field, or a
one-line CLI error with its documented exit code; never UNKNOWN, INTERNAL, UNAVAILABLE, a
traceback or an HTTP 500.

Every case runs against a real ``spendgate serve`` (Redis-backed where the fault was Redis's
answer), the real CLI in a subprocess, or the real console app over a real server.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from spendgate.v1 import config_pb2 as cpb
from spendgate.v1 import config_pb2_grpc, decision_pb2_grpc, policy_pb2_grpc, violation_pb2_grpc
from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import policy_pb2 as ppb
from spendgate.v1 import violation_pb2 as vpb
from spendgate_server.console.app import allowed_origins, create_app
from spendgate_server.console.backend import GrpcBackend
from spendgate_server.console.settings import ConsoleSettings
from starlette.testclient import TestClient

from tests.console.test_console import ORIGIN, post_rules, rules_form, sign_in
from tests.integration.test_security import create_key, decide_request
from tests.processes import SpendgateServer

# A status with its details (sent base64-encoded) must stay below gRPC's 8 KiB soft limit on
# received metadata, past which clients drop responses at random.
MAX_TRAILER_BYTES = 6 * 1024
DEEP = 5000


def spendgate_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spendgate_server", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def invalid_fields(call: Callable[[], Any]) -> tuple[list[str], int]:
    """The fields an INVALID_ARGUMENT names (from its BadRequest), and the size of its details."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    error: Any = info.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    raw = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    request = error_details_pb2.BadRequest()
    assert status.details[1].Unpack(request)
    return [v.field for v in request.field_violations], len(raw) * 4 // 3 + len(error.details() or "")


@pytest.fixture(scope="module")
def open_server() -> Iterator[SpendgateServer]:
    """An open (loopback, no keys) memory-store server, one for the module: every case here is
    refused, which changes nothing another case reads."""
    server = SpendgateServer.start()
    yield server
    server.stop()


@pytest.fixture
def channel(open_server: SpendgateServer) -> Iterator[grpc.Channel]:
    """A channel to the open server: every caller is admin."""
    with grpc.insecure_channel(open_server.target) as opened:
        yield opened


@pytest.fixture
def redis_channel(spendgate: Callable[..., SpendgateServer], redis_url: str) -> Iterator[grpc.Channel]:
    """The same over the Redis store, whose stream commands refused the cursors the validator let by."""
    server = spendgate("--store", "redis", "--redis-url", redis_url)
    with grpc.insecure_channel(server.target) as opened:
        yield opened


def test_superscript_page_token_is_invalid_argument(channel: grpc.Channel) -> None:
    """ListConfigRevisions(page_token="²"): "²".isdigit() is true but int() refuses it; now named."""
    config = config_pb2_grpc.ConfigServiceStub(channel)
    policies = policy_pb2_grpc.PolicyServiceStub(channel)
    for token in ("²", "١٢", "1" * 10, "-1", " 1"):
        fields, _ = invalid_fields(
            partial(config.ListConfigRevisions, cpb.ListConfigRevisionsRequest(page_token=token))
        )
        assert fields == ["page_token"]
        fields, _ = invalid_fields(
            partial(policies.ListPolicyRevisions, ppb.ListPolicyRevisionsRequest(page_token=token))
        )
        assert fields == ["page_token"]
    past_the_end = cpb.ListConfigRevisionsRequest(page_token="7")  # noqa: S106  # a page token, not a secret
    assert config.ListConfigRevisions(past_the_end).revisions == []


@pytest.mark.parametrize(
    ("timestamp", "field"),
    [
        ({"seconds": 2**62}, "start_time.seconds"),
        ({"nanos": -5}, "start_time.nanos"),
        ({"seconds": -1}, "start_time.seconds"),
        ({"nanos": 1_000_000_000}, "start_time.nanos"),
    ],
)
def test_out_of_range_timestamps_are_invalid_argument(
    channel: grpc.Channel, timestamp: dict[str, int], field: str
) -> None:
    """ListViolations with seconds=2^62 or nanos=-5 (was INTERNAL with a traceback) names the field."""
    feed = violation_pb2_grpc.ViolationServiceStub(channel)
    start = timestamp_pb2.Timestamp(**timestamp)
    fields, _ = invalid_fields(lambda: feed.ListViolations(vpb.ListViolationsRequest(start_time=start)))
    assert fields == [field]
    end_field = field.replace("start_time", "end_time")
    fields, _ = invalid_fields(lambda: feed.ListViolations(vpb.ListViolationsRequest(end_time=start)))
    assert fields == [end_field]
    valid = timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_999_999)
    assert feed.ListViolations(vpb.ListViolationsRequest(end_time=valid)).violations == []


@pytest.mark.redis
def test_cursors_redis_would_refuse_are_invalid_argument(redis_channel: grpc.Channel) -> None:
    """A 20-digit cursor (was UNAVAILABLE "Invalid stream ID"), past 2**64 - 1, names its field."""
    feed = violation_pb2_grpc.ViolationServiceStub(redis_channel)
    max_part = 2**64 - 1
    for token in ("99999999999999999999-0", f"{max_part + 1}-0", "0-0", "1-2-3", "²-0"):
        fields, _ = invalid_fields(partial(feed.ListViolations, vpb.ListViolationsRequest(page_token=token)))
        assert fields == ["page_token"]

    def first_watched(cursor: str) -> vpb.WatchViolationsResponse:
        return next(iter(feed.WatchViolations(vpb.WatchViolationsRequest(cursor=cursor))))

    for cursor in ("99999999999999999999-0", f"0-{max_part + 1}", f"{max_part + 1}-{max_part + 1}"):
        fields, _ = invalid_fields(partial(first_watched, cursor))
        assert fields == ["cursor"]
    # The largest ids Redis accepts as these bounds are answered, with nothing found.
    page = feed.ListViolations(vpb.ListViolationsRequest(page_token=f"{max_part}-{max_part}"))
    assert list(page.violations) == []


def test_thirty_thousand_shadow_rules_get_a_small_error(channel: grpc.Channel) -> None:
    """shadow_rules with 30,000 entries (was a 1.88 MB trailer) is one violation in a small trailer."""
    decision = decision_pb2_grpc.DecisionServiceStub(channel)
    config = config_pb2_grpc.ConfigServiceStub(channel)
    flood = pb.EnforcementConfig(shadow_rules=[pb.Rule.ValueType(99)] * 30_000)
    request = decide_request()
    request.enforcement_config.CopyFrom(flood)
    fields, size = invalid_fields(lambda: decision.Decide(request))
    assert fields == ["enforcement_config.shadow_rules"] and size < MAX_TRAILER_BYTES
    fields, size = invalid_fields(
        lambda: config.UpdateConfig(cpb.UpdateConfigRequest(enforcement_config=flood))
    )
    assert fields == ["enforcement_config.shadow_rules"] and size < MAX_TRAILER_BYTES
    # Many bad fields of another kind: the first are named, the rest counted, the trailer stays small.
    policies = policy_pb2_grpc.PolicyServiceStub(channel)
    many = ppb.Policies(approved_models=["!"] * 200)
    fields, size = invalid_fields(lambda: policies.UpdatePolicies(ppb.UpdatePoliciesRequest(policies=many)))
    assert fields[0] == "policies.approved_models[0]" and len(fields) < 200 and size < MAX_TRAILER_BYTES


def one_line_error(result: subprocess.CompletedProcess[str], exit_code: int, *words: str) -> None:
    assert result.returncode == exit_code, result.stderr
    assert "Traceback" not in result.stderr and "RecursionError" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spendgate: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_huge_dollar_amount_is_a_one_line_cli_error(open_server: SpendgateServer, tmp_path: Path) -> None:
    """max_session_usd: 1e999999 (was a decimal.Overflow traceback): exit 2, naming the key and its bound."""
    server = open_server
    rules = tmp_path / "rules.yaml"
    rules.write_text("max_session_usd: 1e999999\n")
    result = spendgate_cli("config", "set", str(rules), "--target", server.target)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        == f"spendgate: {rules}: max_session_usd: must be between 0 and 1000000, got 1e999999"
    )
    one_line_error(
        spendgate_cli(
            "decide",
            "--target",
            server.target,
            "--session",
            "s",
            "--model",
            "m",
            "--config",
            '{"max_session_usd": 1e999999}',
        ),
        2,
        "--config max_session_usd",
    )
    served = tmp_path / "serve.yaml"
    served.write_text("enforcement:\n  max_session_usd: 1e999999\n")
    one_line_error(
        spendgate_cli("serve", "--port", "0", "--metrics-port", "0", "--config", str(served)),
        2,
        "enforcement.max_session_usd: must be between 0 and 1000000",
    )
    # Nothing was written.
    with grpc.insecure_channel(server.target) as channel:
        assert (
            config_pb2_grpc.ConfigServiceStub(channel).GetConfig(cpb.GetConfigRequest()).config.version == 0
        )


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_deeply_nested_documents_are_a_one_line_error(
    open_server: SpendgateServer, tmp_path: Path, suffix: str
) -> None:
    """A document nested 5,000 deep (was RecursionError) in config set, policies set and serve --config."""
    server = open_server
    deep = tmp_path / f"deep{suffix}"
    nested = "[" * DEEP + "]" * DEEP
    deep.write_text(
        f'{{"enforcement": {{"shadow": {nested}}}}}'
        if suffix == ".json"
        else f"enforcement:\n  shadow: {nested}\n"
    )
    for args in (
        ("config", "set", str(deep), "--target", server.target),
        ("policies", "set", str(deep), "--target", server.target),
        ("serve", "--port", "0", "--metrics-port", "0", "--config", str(deep)),
    ):
        one_line_error(spendgate_cli(*args), 2, "nested deeper than 32 levels", str(deep))


def test_billion_laughs_is_refused(tmp_path: Path) -> None:
    """Aliases of aliases expanding to a billion values are refused in one line, before any use."""
    laughs = tmp_path / "laughs.yaml"
    levels = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    laughs.write_text("\n".join(levels) + "\nenforcement:\n  budget_mode: *l8\n")
    one_line_error(
        spendgate_cli("serve", "--port", "0", "--metrics-port", "0", "--config", str(laughs)),
        2,
        "expands to more than 100000 values",
    )


def test_console_huge_dollar_amount_is_a_field_error(
    spendgate: Callable[..., SpendgateServer], tmp_path: Path
) -> None:
    """The Rules form with max_session_usd=1e999999 (was HTTP 500) shows the error beside the field."""
    keys_file = tmp_path / "keys.json"
    admin = create_key(keys_file, "acme", "admin", "ops")
    server = spendgate("--keys-file", str(keys_file))
    settings = ConsoleSettings(port=8080)
    app = create_app(
        backend_factory=lambda: GrpcBackend(server.target),
        origins=allowed_origins(settings, 8080),
        secure_cookies=settings.secure_cookies,
        target=server.target,
        projects=(),
        idle_seconds=600,
        max_age_seconds=3600,
    )
    with TestClient(app, base_url=ORIGIN, follow_redirects=False) as client:
        assert sign_in(client, admin).status_code == 303
        for amount in ("1e999999", "$1e999999", "-1e999999", "NaN"):
            response = post_rules(client, rules_form(client, {"max_session_usd": amount}))
            assert response.status_code == 422, response.text[:300]
            assert "must be between 0 and 1000000" in response.text
        response = post_rules(client, {**rules_form(client, {"token_ceiling": "10"}), "base_version": "²"})
        assert response.status_code == 303
