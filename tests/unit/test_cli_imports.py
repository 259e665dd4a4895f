"""``spendgate --version`` and ``--help`` import no server stack; each command imports its own.

Import time is measured, not asserted (README: `python -X importtime -m spendgate_server
--version`); what is asserted is which modules a run loads, in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("grpc", "google.protobuf", "genai_prices", "redis", "structlog", "yaml", "spendgate_server.app")

PROBE = """
import json, sys
from spendgate_server.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def loaded(*argv: str) -> tuple[int, set[str], str]:
    """Exit code, the modules loaded, and the first line printed by ``spendgate *argv``."""
    run = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60, check=True
    )
    *printed, last = run.stdout.strip().splitlines()
    result = json.loads(last)
    return result["code"], set(result["modules"]), (printed or [""])[0]


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["-h"]])
def test_version_and_help_import_no_server_stack(argv: list[str]) -> None:
    """--version and --help: exit 0, and neither grpc, protobuf, the price catalogue nor Redis is loaded."""
    code, modules, first = loaded(*argv)
    assert code == 0
    assert heavy(modules) == []
    assert first.startswith("spendgate " if argv == ["--version"] else "usage: spendgate ")


def test_a_command_imports_only_what_it_needs() -> None:
    """price --help declares its flags (genai-prices' usage keys) without gRPC or the server."""
    code, modules, first = loaded("price", "--help")
    assert code == 0 and first.startswith("usage: spendgate price ")
    assert "genai_prices" in modules
    assert not {"grpc", "redis", "spendgate_server.app"} & modules


def test_every_command_still_has_its_flags() -> None:
    """Each command's --help lists its own flags (declared lazily, when it is the one run)."""
    for command, flag in (("decide", "--session"), ("serve", "--redis-url"), ("console", "--public-url")):
        run = subprocess.run(
            [sys.executable, "-m", "spendgate_server", command, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert flag in run.stdout, command
