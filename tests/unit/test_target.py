"""The CLI's --target: a port outside 1..65535, or not a number, is refused before any connection."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from spendgate_server.admin.channel import target_problem

HOSTS = ("127.0.0.1", "localhost", "[::1]", "dns:///localhost", "ipv4:127.0.0.1", "ipv6:[::1]")


@given(st.sampled_from(HOSTS), st.integers(min_value=1, max_value=65535))
def test_a_port_in_range_is_accepted(host: str, port: int) -> None:
    assert target_problem(f"{host}:{port}") is None


@given(
    st.sampled_from(HOSTS),
    st.one_of(st.integers(max_value=0), st.integers(min_value=65536)).filter(lambda p: p >= 0),
)
def test_a_port_out_of_range_is_refused(host: str, port: int) -> None:
    """gRPC would wrap 99999 to 34463 and connect to another port: the port is refused instead."""
    assert target_problem(f"{host}:{port}") == f"the port must be in 1..65535, got {port}"


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("127.0.0.1:abc", "the port must be a number in 1..65535, got 'abc'"),
        ("127.0.0.1:", "the port must be a number in 1..65535, got ''"),
        ("127.0.0.1:-1", "the port must be a number in 1..65535, got '-1'"),
        (":50051", "the host is empty"),
        ("[::1", "a bracketed IPv6 host must be '[address]:port'"),
        ("[::1]50051", "a bracketed IPv6 host must be '[address]:port'"),
    ],
)
def test_a_malformed_port_is_refused(target: str, problem: str) -> None:
    assert target_problem(target) == problem


@pytest.mark.parametrize(
    "target", ["localhost", "::1", "[::1]", "unix:/run/spendgate.sock", "unix-abstract:sg"]
)
def test_targets_without_a_port_are_left_to_grpc(target: str) -> None:
    """A bare host takes gRPC's default port; unix sockets have none."""
    assert target_problem(target) is None


@pytest.mark.parametrize(
    "argv",
    [
        ["decide", "--session", "s", "--model", "claude-sonnet-4-5"],
        ["settle", "--session", "s", "--reservation", "r", "--model", "claude-sonnet-4-5"],
        ["violations", "list"],
        ["violations", "tail"],
    ],
)
def test_every_command_with_a_target_refuses_a_bad_port(argv: list[str]) -> None:
    """A real `spendgate` process: exit 2, one line naming --target, and no connection attempt."""
    run = subprocess.run(
        [sys.executable, "-m", "spendgate_server", *argv, "--target", "127.0.0.1:99999"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [
        "spendgate: --target (or SPENDGATE_TARGET) 127.0.0.1:99999: the port must be in 1..65535, got 99999"
    ]
