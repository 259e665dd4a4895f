"""Security: API keys and scopes, revocation, safe defaults, tenant isolation, TLS/mTLS, secrets, fuzzing."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spendgate.v1 import config_pb2 as cpb
from spendgate.v1 import config_pb2_grpc, decision_pb2_grpc
from spendgate.v1 import decision_pb2 as pb
from spendgate_client import DecisionClient, tls_credentials

from tests.processes import SpendgateServer

POLL_SECONDS = 15.0


def spendgate_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spendgate_server", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def create_key(keys_file: Path, tenant: str, scope: str, name: str) -> str:
    result = spendgate_cli(
        "keys", "create", "--keys-file", str(keys_file), "--tenant", tenant, "--scope", scope, "--name", name
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[0]


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def decide_request(session: str = "s", prompt: str = "p", input_tokens: int = 100) -> pb.DecideRequest:
    return pb.DecideRequest(
        session_id=session,
        model="claude-sonnet-4-5",
        input_tokens=input_tokens,
        max_output_tokens=100,
        fingerprint=hashlib.sha256(prompt.encode()).digest(),
    )


Keyed = tuple[SpendgateServer, dict[str, str], Path]


@pytest.fixture
def keyed(spendgate: Callable[..., SpendgateServer], tmp_path: Path) -> Keyed:
    """A server with keys: acme admin and client, globex client."""
    keys_file = tmp_path / "keys.json"
    keys = {
        "admin": create_key(keys_file, "acme", "admin", "ops"),
        "client": create_key(keys_file, "acme", "client", "agent"),
        "other": create_key(keys_file, "globex", "client", "agent"),
    }
    server = spendgate("--keys-file", str(keys_file), "--key-reload-seconds", "0.2")
    return server, keys, keys_file


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    code: grpc.StatusCode = info.value.code()
    return code


def test_calls_without_a_valid_key_are_unauthenticated(keyed: Keyed) -> None:
    """No key, a malformed key, and a well-formed key with a wrong secret are all UNAUTHENTICATED."""
    server, keys, _ = keyed
    wrong_secret = keys["client"][:-4] + ("AAAA" if not keys["client"].endswith("AAAA") else "BBBB")
    with grpc.insecure_channel(server.target) as channel:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)
        attempts: list[tuple[tuple[str, str], ...]] = [
            (),
            bearer("nonsense"),
            bearer(wrong_secret),
            bearer("sgk_00000000_" + "x" * 43),
        ]
        for metadata in attempts:
            with pytest.raises(grpc.RpcError) as info:
                stub.Decide(decide_request(), metadata=metadata)
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert stub.Decide(decide_request(), metadata=bearer(keys["client"])).verdict == pb.VERDICT_ALLOW


def test_client_scope_cannot_write_config(keyed: Keyed) -> None:
    """A client key reads its config but writing needs an admin key, whose name is audited."""
    server, keys, _ = keyed
    update = cpb.UpdateConfigRequest(enforcement_config=pb.EnforcementConfig(token_ceiling=50))
    with grpc.insecure_channel(server.target) as channel:
        stub = config_pb2_grpc.ConfigServiceStub(channel)
        assert stub.GetConfig(cpb.GetConfigRequest(), metadata=bearer(keys["client"])).config.version == 0
        assert code_of(lambda: stub.UpdateConfig(update, metadata=bearer(keys["client"]))) is (
            grpc.StatusCode.PERMISSION_DENIED
        )
        written = stub.UpdateConfig(update, metadata=bearer(keys["admin"])).config
        assert written.updated_by.startswith("ops (")


def test_revoked_key_stops_working(keyed: Keyed) -> None:
    """After `spendgate keys revoke`, the key is refused within the reload period."""
    server, keys, keys_file = keyed
    key_id = keys["client"].split("_")[1]
    assert key_id in spendgate_cli("keys", "list", "--keys-file", str(keys_file)).stdout
    assert spendgate_cli("keys", "revoke", key_id, "--keys-file", str(keys_file)).returncode == 0
    with grpc.insecure_channel(server.target) as channel:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)
        deadline = time.monotonic() + POLL_SECONDS
        refused: grpc.StatusCode | None = None
        while refused is None:
            try:
                stub.Decide(decide_request(prompt=str(time.monotonic())), metadata=bearer(keys["client"]))
            except grpc.RpcError as exc:
                refused = exc.code()
            assert time.monotonic() < deadline, "revoked key still accepted"
            time.sleep(0.05)
        assert refused is grpc.StatusCode.UNAUTHENTICATED
        assert stub.Decide(decide_request(), metadata=bearer(keys["other"])).verdict == pb.VERDICT_ALLOW
    assert "revoked" in spendgate_cli("keys", "list", "--keys-file", str(keys_file)).stdout


def test_tenants_are_isolated(keyed: Keyed) -> None:
    """Two tenants with the same session id share no spend and no config."""
    server, keys, _ = keyed
    budget = pb.EnforcementConfig(max_session_nano_usd=1)
    with grpc.insecure_channel(server.target) as channel:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)
        config = config_pb2_grpc.ConfigServiceStub(channel)
        first = decide_request("shared", "a")
        first.enforcement_config.CopyFrom(budget)
        assert stub.Decide(first, metadata=bearer(keys["client"])).verdict == pb.VERDICT_ALLOW
        second = decide_request("shared", "b")
        second.enforcement_config.CopyFrom(budget)
        assert stub.Decide(second, metadata=bearer(keys["client"])).verdict == pb.VERDICT_BLOCK
        other = stub.Decide(second, metadata=bearer(keys["other"]))
        assert (other.verdict, other.session_spend_nano_usd) == (
            pb.VERDICT_ALLOW,
            other.estimated_cost_nano_usd,
        )
        config.UpdateConfig(
            cpb.UpdateConfigRequest(enforcement_config=pb.EnforcementConfig(token_ceiling=10)),
            metadata=bearer(keys["admin"]),
        )
        assert config.GetConfig(cpb.GetConfigRequest(), metadata=bearer(keys["other"])).config.version == 0
        assert (
            stub.Decide(decide_request("x", "c"), metadata=bearer(keys["other"])).verdict == pb.VERDICT_ALLOW
        )


def test_secrets_never_reach_logs_or_errors(keyed: Keyed) -> None:
    """Refused keys are logged by id and reason only; no secret appears in logs or error messages."""
    server, keys, _ = keyed
    secret = keys["client"].split("_", 2)[2]
    forged = keys["client"][:-1] + ("A" if keys["client"][-1] != "A" else "B")
    with grpc.insecure_channel(server.target) as channel:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Decide(decide_request(), metadata=bearer(forged))
        assert secret[:-1] not in (info.value.details() or "")
        stub.Decide(decide_request(), metadata=bearer(keys["client"]))
    log = server.log_path.read_text()
    assert "auth_failed" in log
    for key in keys.values():
        assert key.split("_", 2)[2] not in log
    assert forged.split("_", 2)[2] not in log


def test_non_loopback_without_keys_refuses_to_start() -> None:
    """Bound beyond loopback with no keys, the server refuses in one line unless --insecure."""
    result = spendgate_cli("serve", "--host", "0.0.0.0", "--port", "0", "--metrics-port", "0")  # noqa: S104  # the refusal under test
    assert result.returncode == 2 and "--insecure" in result.stderr and "Traceback" not in result.stderr


def test_insecure_flag_allows_open_mode(spendgate: Callable[..., SpendgateServer]) -> None:
    """--insecure serves without keys on any address, loudly."""
    server = spendgate("--host", "0.0.0.0", "--insecure")  # noqa: S104  # explicitly insecure mode under test
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        assert (
            decision_pb2_grpc.DecisionServiceStub(channel).Decide(decide_request()).verdict
            == pb.VERDICT_ALLOW
        )
    assert any(e.get("event") == "open_dev_mode" for e in server.log_events())


# --- TLS -----------------------------------------------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, made here."""
    d = tmp_path_factory.mktemp("pki")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=spendgate-test-ca",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            cwd=d,
        )
    return d


def decide_over(target: str, credentials: grpc.ChannelCredentials | None) -> int:
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        return int(decision_pb2_grpc.DecisionServiceStub(channel).Decide(decide_request(), timeout=3).verdict)


def test_tls(spendgate: Callable[..., SpendgateServer], pki: Path) -> None:
    """A TLS server answers clients that trust its CA and refuses plaintext."""
    server = spendgate("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"))
    assert decide_over(server.target, tls_credentials(str(pki / "ca.pem"))) == pb.VERDICT_ALLOW
    with pytest.raises(grpc.RpcError):
        decide_over(server.target, None)


def test_mtls(spendgate: Callable[..., SpendgateServer], pki: Path) -> None:
    """With --tls-client-ca only clients presenting a certificate signed by it connect."""
    server = spendgate(
        "--tls-cert",
        str(pki / "server.pem"),
        "--tls-key",
        str(pki / "server.key"),
        "--tls-client-ca",
        str(pki / "ca.pem"),
    )
    with pytest.raises(grpc.RpcError):
        decide_over(server.target, tls_credentials(str(pki / "ca.pem")))
    with_cert = tls_credentials(str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key"))
    assert decide_over(server.target, with_cert) == pb.VERDICT_ALLOW
    with DecisionClient(server.target, timeout=3, credentials=with_cert, fail_mode="closed") as client:
        assert client.decide("tls", "claude-sonnet-4-5", 1, 1, b"t" * 32).allowed


# --- fuzzing -------------------------------------------------------------------------------

METHODS = [
    "/spendgate.v1.DecisionService/Decide",
    "/spendgate.v1.DecisionService/Settle",
    "/spendgate.v1.ConfigService/GetConfig",
    "/spendgate.v1.ConfigService/UpdateConfig",
    "/spendgate.v1.ConfigService/ListConfigRevisions",
]
ACCEPTABLE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
valid = decide_request().SerializeToString()
extreme_ints = st.sampled_from([0, -1, 1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63)])


def mutated(data: bytes, positions: list[int], values: list[int]) -> bytes:
    out = bytearray(data)
    for pos, val in zip(positions, values, strict=False):
        if out:
            out[pos % len(out)] = val
    return bytes(out)


payloads = st.one_of(
    st.binary(max_size=300),
    st.builds(
        mutated,
        st.just(valid),
        st.lists(st.integers(0, 10_000), max_size=6),
        st.lists(st.integers(0, 255), max_size=6),
    ),
    st.builds(
        lambda t, o, c, s: pb.DecideRequest(
            session_id=s,
            model="m",
            input_tokens=t,
            max_output_tokens=o,
            tool_call_count=c,
            fingerprint=b"f" * 32,
        ).SerializeToString(),
        extreme_ints,
        extreme_ints,
        extreme_ints,
        st.text(max_size=200),
    ),
)


@pytest.fixture(scope="module")
def fuzz_target() -> object:
    server = SpendgateServer.start("--metrics-port", "0")
    yield server
    server.stop()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(METHODS), payload=payloads)
def test_fuzzed_bytes_get_an_answer(fuzz_target: SpendgateServer, method: str, payload: bytes) -> None:
    """Arbitrary and mutated bytes to every RPC get a decision or a clear error, within the deadline."""
    with grpc.insecure_channel(fuzz_target.target) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            method, request_serializer=None, response_deserializer=None
        )
        code = grpc.StatusCode.OK
        try:
            call(payload, timeout=5)
        except grpc.RpcError as exc:
            code = exc.code()
        assert code is grpc.StatusCode.OK or code in ACCEPTABLE, code


def test_fuzzing_never_disturbs_other_clients(fuzz_target: SpendgateServer) -> None:
    """While garbage is sent, a well-behaved client keeps getting decisions, and the server lives."""
    stop = threading.Event()

    def garbage() -> None:
        with grpc.insecure_channel(fuzz_target.target) as channel:
            call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                METHODS[0], request_serializer=None, response_deserializer=None
            )
            n = 0
            while not stop.is_set():
                n += 1
                with contextlib.suppress(grpc.RpcError):
                    call(bytes([n % 256]) * (n % 512), timeout=5)

    thread = threading.Thread(target=garbage)
    thread.start()
    try:
        with DecisionClient(fuzz_target.target, timeout=5, fail_mode="closed") as client:
            for i in range(50):
                fingerprint = hashlib.sha256(bytes([i])).digest()
                assert client.decide(f"good-{i}", "claude-sonnet-4-5", 10, 10, fingerprint).allowed
    finally:
        stop.set()
        thread.join()
    assert fuzz_target.process.poll() is None
    assert "internal_error" not in fuzz_target.log_path.read_text()


def test_corrupt_bytes_are_invalid_argument(fuzz_target: SpendgateServer) -> None:
    """Bytes that are no DecideRequest get INVALID_ARGUMENT naming the request, not UNKNOWN."""
    with grpc.insecure_channel(fuzz_target.target) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            METHODS[0], request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff", timeout=5)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "request" in (info.value.details() or "")
