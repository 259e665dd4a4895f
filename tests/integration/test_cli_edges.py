"""Bad input at the edges of the ``spendgate`` command: refused in one line, with the bad-input code.

Exit codes (README): 1 the service or the store failed or refused the call, 2 a bad flag or
value. Each flag carrying an id, an etag, a cursor or a time is judged by the service's own
validation (rpc/validation.py), run by the CLI before anything is sent; the service refuses
the same values with INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from spendgate.v1 import config_pb2 as cpb
from spendgate.v1 import config_pb2_grpc, policy_pb2_grpc, violation_pb2_grpc
from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import policy_pb2 as ppb
from spendgate.v1 import violation_pb2 as vpb
from spendgate_server.engine.price_units import USAGE_KEYS
from spendgate_server.errors import InvalidArgument
from spendgate_server.rpc.validation import priced_usage, settle_from_proto

from tests.integration.test_cli import Run, run_cli, spendgate_process
from tests.processes import SpendgateServer, free_port

MODEL = "claude-sonnet-4-5"
SESSION_RULE = "must be 1-128 characters of [A-Za-z0-9._:@/+=-]"
ETAG_REFUSED = (
    "spendgate: --etag: must be empty (create), or the etag last read: the version number, up to 19 digits"
)


def assert_refused(run: Run, line: str) -> None:
    """Exit 2, and stderr is exactly ``line`` (no traceback, nothing else)."""
    assert (run.code, run.error_lines, run.stdout) == (2, [line], ""), run.stderr


def bad_request_fields(exc: grpc.RpcError) -> list[str]:
    """The fields an INVALID_ARGUMENT's BadRequest names."""
    assert isinstance(exc, grpc.Call)
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):
                    return [v.field for v in bad.field_violations]
    return []


@pytest.fixture(scope="module")
def server() -> Iterator[SpendgateServer]:
    """One open server (memory store) for the module."""
    started = SpendgateServer.start()
    yield started
    started.stop()


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text("token_ceiling: 4000\n")
    return path


# ---------------------------------------------------------------------------------------------
# 1. Etags, cursors, times and ids: malformed is bad input (2), not a failed call (1).


@pytest.mark.parametrize("etag", ["x{y", "abc", "-1", "1.0", " 1", "1" * 20, "²"])
def test_config_set_malformed_etag_is_bad_input(server: SpendgateServer, rules: Path, etag: str) -> None:
    """config set --etag <malformed>: exit 2 naming --etag, and nothing is written."""
    run = run_cli("config", "set", str(rules), "--etag", etag, "--target", server.target)
    assert_refused(run, ETAG_REFUSED)
    assert run_cli("config", "get", "--target", server.target).stdout.startswith(
        "# tenant config, version 0,"
    )


def test_policies_set_malformed_etag_is_bad_input(server: SpendgateServer, tmp_path: Path) -> None:
    """policies set --etag <malformed>: exit 2 naming --etag, even with no server to ask."""
    policies = tmp_path / "policies.yaml"
    policies.write_text("approved_models: [claude-sonnet-4-5]\n")
    unreachable = f"127.0.0.1:{free_port()}"
    run = run_cli("policies", "set", str(policies), "--etag", "v1", "--target", unreachable)
    assert_refused(run, ETAG_REFUSED)


def test_stale_well_formed_etag_is_still_a_refused_call(server: SpendgateServer, rules: Path) -> None:
    """A well-formed but stale etag is the service's refusal (compare-and-set): exit 1, as documented."""
    run = run_cli(
        "config", "set", str(rules), "--etag", "999", "--target", server.target, "--project", "stale"
    )
    assert run.code == 1 and len(run.error_lines) == 1
    assert run.error_lines == [
        "spendgate: etag mismatch for project 'stale': it was changed since you read it (current etag "
        "none: it does not exist); read it again and retry"
    ]


def test_service_refuses_a_malformed_etag_as_invalid_argument(server: SpendgateServer) -> None:
    """UpdateConfig and UpdatePolicies with a malformed etag: INVALID_ARGUMENT on `etag`, nothing written."""
    with grpc.insecure_channel(server.target) as channel:
        configs = config_pb2_grpc.ConfigServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            configs.UpdateConfig(cpb.UpdateConfigRequest(project="etags", etag="x{y"), timeout=5)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(info.value) == ["etag"]
        assert configs.GetConfig(cpb.GetConfigRequest(project="etags"), timeout=5).config.version == 0

        policies = policy_pb2_grpc.PolicyServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            policies.UpdatePolicies(ppb.UpdatePoliciesRequest(etag="0x1"), timeout=5)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(info.value) == ["etag"]


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["violations", "tail", "--cursor", "abc"],
            'spendgate: --cursor: must be empty, "0" or a Violation.cursor: <milliseconds>-<sequence>',
        ),
        (
            ["violations", "tail", "--cursor", f"{2**64}-0"],
            'spendgate: --cursor: must be empty, "0" or a Violation.cursor: <milliseconds>-<sequence>',
        ),
        (
            ["violations", "list", "--since", "1h", "--until", "2h"],
            "spendgate: --until: must be after start_time",
        ),
        (
            ["settle", "--session", "s", "--reservation", "r-1", "--model", MODEL],
            "spendgate: --reservation: must be 32 lowercase hex characters (DecideResponse.reservation_id)",
        ),
        (
            ["decide", "--session", "s", "--model", MODEL, "--request-id", "a{b}"],
            "spendgate: --request-id: must be empty, or 1-128 characters of [A-Za-z0-9._:@/+=-]",
        ),
        (
            ["config", "history", "--project", "a/b"],
            "spendgate: --project: must be empty, or 1-64 characters of [A-Za-z0-9._-]",
        ),
    ],
)
def test_malformed_flags_are_refused_before_connecting(argv: list[str], line: str) -> None:
    """Cursors, times, reservation and request ids, projects: exit 2 naming the flag, no server needed."""
    assert_refused(run_cli(*argv, "--target", f"127.0.0.1:{free_port()}"), line)


def test_the_largest_stream_id_is_a_cursor_the_cli_accepts() -> None:
    """--cursor 18446744073709551615-18446744073709551615 (was exit 2) passes the check: the call is made."""
    target = f"127.0.0.1:{free_port()}"
    run = run_cli("violations", "tail", "--cursor", f"{2**64 - 1}-{2**64 - 1}", "--target", target)
    assert run.code == 1 and len(run.error_lines) == 1, run.stderr
    assert run.error_lines[0].startswith(f"spendgate: cannot reach spendgate at {target}")


def test_from_start_and_cursor_together_are_refused() -> None:
    """--from-start --cursor 1-0 (was accepted, the cursor silently ignored): exit 2 naming both flags."""
    run = run_cli(
        "violations", "tail", "--from-start", "--cursor", "1-0", "--target", f"127.0.0.1:{free_port()}"
    )
    assert run.code == 2 and len(run.error_lines) == 1 and run.stdout == "", run.stderr
    assert "argument --cursor: not allowed with argument --from-start" in run.error_lines[0]


def test_keys_revoke_malformed_id_is_named(tmp_path: Path) -> None:
    """keys revoke <not a key id>: exit 2 saying what a key id is."""
    run = run_cli("keys", "revoke", "x{y}", "--keys-file", str(tmp_path / "keys.json"))
    assert_refused(run, "spendgate: 'x{y}' is not a key id: the 8 lowercase hex digits after 'sgk_'")


def test_malformed_etag_as_a_process(rules: Path) -> None:
    """As a real process: one line on stderr, exit 2, no traceback."""
    result = spendgate_process(
        "config", "set", str(rules), "--etag", "x{y", "--target", f"127.0.0.1:{free_port()}"
    )
    assert result.returncode == 2
    assert result.stderr == ETAG_REFUSED + "\n"


# ---------------------------------------------------------------------------------------------
# 2. A session or project filter follows Decide's rules for the field.


@pytest.mark.parametrize("action", ["list", "tail"])
def test_violations_session_filter_follows_decides_rule(server: SpendgateServer, action: str) -> None:
    """violations list|tail --session 'a{b}': refused in the words decide uses for --session, exit 2."""
    decide = run_cli("decide", "--session", "a{b}", "--model", MODEL, "--target", server.target)
    assert_refused(decide, f"spendgate: --session: {SESSION_RULE}")
    run = run_cli("violations", action, "--session", "a{b}", "--target", server.target)
    assert_refused(run, f"spendgate: --session: {SESSION_RULE}")
    project = run_cli("violations", action, "--project", "a b", "--target", server.target)
    assert_refused(project, "spendgate: --project: must be empty, or 1-64 characters of [A-Za-z0-9._-]")


def test_violations_accepts_every_id_decide_accepts(server: SpendgateServer) -> None:
    """An id Decide accepts (':', '@', '/', '+', '=' included) is a valid filter: exit 0."""
    session = "run:7@host/a+b=c"
    assert run_cli("decide", "--session", session, "--model", MODEL, "--target", server.target).code == 0
    run = run_cli("violations", "list", "--session", session, "--target", server.target)
    assert (run.code, run.error_lines) == (0, ["no violations"])


def test_service_refuses_a_filter_no_decide_could_record(server: SpendgateServer) -> None:
    """ListViolations and WatchViolations: INVALID_ARGUMENT naming session_id and project."""
    with grpc.insecure_channel(server.target) as channel:
        stub = violation_pb2_grpc.ViolationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ListViolations(vpb.ListViolationsRequest(session_id="a{b}", project="a b"), timeout=5)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(info.value) == ["session_id", "project"]
        with pytest.raises(grpc.RpcError) as info:
            next(iter(stub.WatchViolations(vpb.WatchViolationsRequest(session_id="x" * 129), timeout=5)))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(info.value) == ["session_id"]


def test_violations_bad_session_as_a_process() -> None:
    """As a real process: one line on stderr, exit 2, no traceback."""
    result = spendgate_process(
        "violations", "list", "--session", "a{b}", "--target", f"127.0.0.1:{free_port()}"
    )
    assert (result.returncode, result.stderr) == (2, f"spendgate: --session: {SESSION_RULE}\n")


# ---------------------------------------------------------------------------------------------
# 3. spendgate price bounds the model, counts and tier as Settle does.


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        ([""], "spendgate: MODEL: must be 1-128 characters of [A-Za-z0-9._:@/+=-]"),
        (["a b"], "spendgate: MODEL: must be 1-128 characters of [A-Za-z0-9._:@/+=-]"),
        (["m" * 129], "spendgate: MODEL: must be 1-128 characters of [A-Za-z0-9._:@/+=-]"),
        (
            [MODEL, "--input-tokens", str(10**30)],
            f"spendgate price: argument --input-tokens: is too large, got {10**30} "
            "(see 'spendgate price --help')",
        ),
        (
            [MODEL, "--input-tokens", str(10**18), "--output-tokens", "1000001"],
            f"spendgate: --input-tokens: must be between 0 and 10000000, got {10**18}; "
            "--output-tokens: must be between 0 and 1000000, got 1000001",
        ),
        (
            [MODEL, "--web-searches", str(10**9 + 1)],
            "spendgate: --web-searches: must be between 0 and 1000000000, got 1000000001",
        ),
        ([MODEL, "--tier", "x" * 33], "spendgate: --tier: must be 0-32 characters of [A-Za-z0-9._-]"),
    ],
)
def test_price_refuses_what_settle_refuses(argv: list[str], line: str) -> None:
    """price: an empty or malformed model, absurd counts, a bad tier: one line, exit 2."""
    assert_refused(run_cli("price", *argv), line)


def test_price_takes_settles_largest_counts() -> None:
    """At Settle's bounds exactly, price quotes: 10M input + 1M output tokens of Sonnet 4.5 is $75."""
    run = run_cli("price", MODEL, "--input-tokens", "10000000", "--output-tokens", "1000000", "--json")
    assert run.code == 0, run.stderr
    # Past 200,000 input tokens the long-context rates apply: $6 and $22.50 per MTok.
    assert '"cost_nano_usd": 82500000000' in run.stdout


def test_price_bounds_are_settles_bounds() -> None:
    """price and Settle judge every usage key alike, at its bound and one past it (one shared check)."""

    def refused(check: Callable[[], object]) -> list[str]:
        try:
            check()
        except InvalidArgument as exc:
            return [v.field for v in exc.violations]
        return []

    for key in sorted(USAGE_KEYS):
        for value in (10_000_000, 10_000_001, 1_000_000_001):
            usage = pb.Usage(counts={key: value})
            request = pb.SettleRequest(
                session_id="s",
                reservation_id="0" * 32,
                model=MODEL,
                usage=usage,
                outcome=pb.PROVIDER_OUTCOME_OK,
            )
            by_settle = refused(partial(settle_from_proto, request, "t"))
            by_price = refused(partial(priced_usage, MODEL, {key: value}, ""))
            assert by_price == by_settle, (key, value)
            if value > 1_000_000_000:  # past every count's bound
                assert by_price == [f"usage.counts[{key}]"], key


# ---------------------------------------------------------------------------------------------
# 4. Every host:port is checked at start.


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("127.0.0.1:99999", "the port must be in 1..65535, got 99999"),
        ("127.0.0.1:http", "the port must be a number in 1..65535, got 'http'"),
        ("localhost:0", "the port must be in 1..65535, got 0"),
    ],
)
def test_console_bad_target_is_refused_at_start(target: str, problem: str) -> None:
    """console --target with a port out of range or not a number: one line, exit 2, nothing served."""
    result = spendgate_process("console", "--port", "0", "--target", target)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"spendgate: --target (env SPENDGATE_CONSOLE_TARGET) {target}: {problem}\n"


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/hook", "https://hooks.example:abc/", "http://h:0/"])
def test_serve_bad_webhook_port_is_refused_at_start(tmp_path: Path, url: str) -> None:
    """serve --webhook-url with a bad port: one line, exit 2 (not deliveries failing for ever)."""
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    result = spendgate_process(
        "serve",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--webhook-url",
        url,
        "--webhook-secret-file",
        str(secret),
    )
    assert result.returncode == 2
    assert result.stderr == (
        "spendgate: --webhook-url (env SPENDGATE_WEBHOOK_URL) must name a host and, if any, a port in "
        f"1..65535, got {url!r}\n"
    )


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["--port", "99999"],
            "spendgate: --port (env SPENDGATE_PORT) must be an integer between 0 and 65535, got '99999'",
        ),
        (
            ["--metrics-port", "http"],
            "spendgate: --metrics-port (env SPENDGATE_METRICS_PORT) must be an integer between 0 and 65535, "
            "got 'http'",
        ),
    ],
)
def test_serve_bad_ports_are_refused_at_start(argv: list[str], line: str) -> None:
    """serve --port/--metrics-port out of range or not a number: one line, exit 2."""
    result = spendgate_process("serve", *argv)
    assert (result.returncode, result.stderr) == (2, line + "\n")


@pytest.mark.parametrize("command", ["config", "policies"])
def test_a_stale_etag_fails_even_when_nothing_changed(
    server: SpendgateServer, tmp_path: Path, command: str
) -> None:
    """set --etag 0 with the current etag 1 and the same content: the stale etag's refusal, exit 1."""
    path = tmp_path / "doc.yaml"
    project = ["--project", "stale-same"] if command == "config" else []
    path.write_text("token_ceiling: 4000\n" if command == "config" else "approved_models: [gpt-4o-mini]\n")
    target = ["--target", server.target, *project]
    first = run_cli(command, "set", str(path), *target)
    assert first.code == 0, first.stderr
    header = run_cli(command, "get", *target).stdout.splitlines()[0]
    current = int(header.split(", etag ")[1].split(",")[0])  # 1 on a fresh server: the case
    stale = run_cli(command, "set", str(path), "--etag", str(current - 1), *target)
    assert stale.code == 1 and len(stale.error_lines) == 1, stale.stdout
    assert "etag mismatch" in stale.stderr and f"current etag {current}" in stale.stderr
    same = run_cli(command, "set", str(path), "--etag", str(current), *target)
    assert same.code == 0 and same.stdout.startswith("no change to the"), same.stderr
