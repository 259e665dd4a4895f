"""The client refuses a target whose port no connection can use, the way the CLI does.

With ``fail_mode="open"`` a target on a wrapped or unparsable port would fail every call
and so allow every call unguarded; the client refuses it when it is made. The client is
installable alone and keeps its own copy of the check: it is compared with the server's.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from spendgate_client import DecisionClient, JournaledAnthropic
from spendgate_client._target import target_problem as client_problem
from spendgate_server.admin.channel import target_problem as server_problem

PIECES = st.sampled_from(
    ["127.0.0.1", "localhost", "[::1]", "::1", "[", "]", ":", ",", "/", "//", "dns:", "ipv4:", "ipv6:",
     "unix:", "unix:///tmp/s", "dns://8.8.8.8/", "0", "1", "50051", "65535", "65536", "99999", "-1",
     "abc", "²", "", " "]
)  # fmt: skip


@given(st.lists(PIECES, max_size=6).map("".join) | st.text(max_size=20))
def test_client_and_server_judge_every_target_alike(target: str) -> None:
    """Differential: the client's copy of the check answers exactly as the server's."""
    assert client_problem(target) == server_problem(target)


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("127.0.0.1:99999", "the port must be in 1..65535, got 99999"),
        ("127.0.0.1:abc", "the port must be a number in 1..65535, got 'abc'"),
        ("dns:///spendgate:0", "the port must be in 1..65535, got 0"),
    ],
)
def test_a_bad_port_is_refused_when_the_client_is_made(target: str, problem: str) -> None:
    """DecisionClient and the wrappers raise ValueError at construction, naming the target."""
    message = f"spendgate target (or SPENDGATE_TARGET) {target!r}: {problem}"
    with pytest.raises(ValueError, match="port") as info:
        DecisionClient(target)
    assert str(info.value) == message
    with pytest.raises(ValueError, match="port") as info:
        JournaledAnthropic(api_key="sk-ant-test", session_id="s", spendgate_target=target)
    assert str(info.value) == message


def test_a_bad_port_from_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """SPENDGATE_TARGET is checked as the argument is."""
    monkeypatch.setenv("SPENDGATE_TARGET", "127.0.0.1:70000")
    with pytest.raises(ValueError, match=r"the port must be in 1\.\.65535, got 70000"):
        DecisionClient()


def test_a_good_target_makes_a_client() -> None:
    """A valid port, a bare host and a unix socket are taken as they are."""
    for target in ("127.0.0.1:50051", "localhost", "unix:///tmp/spendgate.sock"):
        DecisionClient(target).close()
