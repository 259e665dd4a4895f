"""Ctrl-C ends a client command waiting on a server that does not answer: at once, 130, one line.

The server is real and frozen with SIGSTOP (by its PID): the kernel still completes the TCP
handshake, so the command connects and then waits for an answer that never comes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import SpendgateServer

_RESERVATION = "0" * 32
COMMANDS = {
    "decide": ["decide", "--session", "h", "--model", "gpt-4o-mini"],
    "settle": ["settle", "--session", "h", "--reservation", _RESERVATION, "--model", "gpt-4o-mini"],
    "config get": ["config", "get"],
    "config history": ["config", "history"],
    "policies get": ["policies", "get"],
    "violations list": ["violations", "list"],
    "violations tail": ["violations", "tail"],
}


@pytest.fixture(scope="module")
def server() -> Iterator[SpendgateServer]:
    started = SpendgateServer.start()
    yield started
    started.stop()


def _connected(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds an established TCP connection to ``port`` on loopback."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    # A server bound to [::] shows loopback IPv4 connections in tcp6 too.
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    rows = [line for table in tables if table.exists() for line in table.read_text().splitlines()[1:]]
    for line in rows:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        if remote_port == port and fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
            return True
    return False


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc to see the connection")
@pytest.mark.parametrize("command", COMMANDS)
def test_ctrl_c_ends_a_command_waiting_on_a_frozen_server(server: SpendgateServer, command: str) -> None:
    """The issue's input: `decide --timeout 30` on a SIGSTOPped server, SIGINT once it waits."""
    argv = [sys.executable, "-m", "spendgate_server", *COMMANDS[command], "--target", server.target]
    if command != "violations tail":
        argv += ["--timeout", "30"]
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        cli = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while not _connected(cli.pid, server.port):  # waits for a state, not for time to pass
            assert cli.poll() is None, cli.communicate()
            assert time.monotonic() < deadline, "the command never connected"
            time.sleep(0.02)
        cli.send_signal(signal.SIGINT)
        # Well inside the 30 s deadline: the call did not run to its end.
        out, err = cli.communicate(timeout=10)
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    assert cli.returncode == 130, err
    assert err.splitlines() == ["spendgate: interrupted"]
    assert out == ""
