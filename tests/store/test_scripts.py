"""The session scripts' headers match the declared KEYS, ARGV and reply their callers build."""

from __future__ import annotations

import re
from importlib import resources

import pytest
from spendgate_server.store import BudgetCheck, DecidedCall, DedupCheck, ReserveRequest, SessionKey, ToolCheck
from spendgate_server.store.redis import DECIDE, SCRIPTS, ScriptSignature, decide_args

HEADER_LINE = re.compile(r"^-- (KEYS|ARGV)\[(\d+)\]\s+(\w+)", re.MULTILINE)
REPLY = re.compile(r"^-- Reply: \{([^}]*)\}", re.MULTILINE)
UNPACK = re.compile(r"^local ([\w,\s]+?) = unpack\((KEYS|ARGV)\)", re.MULTILINE)


def source(name: str) -> str:
    return (resources.files("spendgate_server.store") / "lua" / f"{name}.lua").read_text()


def header(text: str, table: str) -> list[str]:
    """The names the header lists for KEYS or ARGV, checked to be numbered 1..n in order."""
    entries = [(int(n), name) for kind, n, name in HEADER_LINE.findall(text) if kind == table]
    assert [n for n, _ in entries] == list(range(1, len(entries) + 1)), f"{table} numbering"
    return [name for _, name in entries]


def unpacked(text: str, table: str) -> list[str]:
    """The local names of the script's one ``local ... = unpack(KEYS|ARGV)`` line."""
    found = [names for names, which in UNPACK.findall(text) if which == table]
    assert len(found) == 1, f"one unpack({table}) line"
    return [name.strip() for name in found[0].split(",")]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.name)
def test_header_matches_declaration(script: ScriptSignature[object]) -> None:
    """KEYS, ARGV and the reply in the header are the declared ones, and the body binds them by name."""
    text = source(script.name)
    assert header(text, "KEYS") == list(script.keys) == unpacked(text, "KEYS")
    assert header(text, "ARGV") == [name for name, _ in script.argv] == unpacked(text, "ARGV")
    reply = REPLY.search(text)
    assert reply is not None
    assert [name.strip() for name in reply.group(1).split(",")] == list(script.reply)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.name)
def test_body_reads_argv_only_through_the_unpack_line(script: ScriptSignature[object]) -> None:
    """No ARGV[n] or KEYS[n] in the body: a position can only be bound in the checked line."""
    body = "\n".join(line for line in source(script.name).splitlines() if not line.startswith("--"))
    assert not re.search(r"(ARGV|KEYS)\[", body)


def test_decide_args_follow_the_declared_order() -> None:
    """Every value of a ReserveRequest lands at the position its name has in the header."""
    request = ReserveRequest(
        session=SessionKey("t", "s"),
        now_ms=11,
        reservation_id="r" * 32,
        estimate_nano_usd=13,
        reservation_ttl_ms=14,
        session_ttl_ms=15,
        tool_call_count=16,
        dedup=DedupCheck("ab" * 16, 17, shadow=True),
        tools=ToolCheck(18),
        budget=BudgetCheck(19, strict=True),
        request_id="req",
        memo="memo",
        decided=DecidedCall("m", 13, 20, 21),
    )
    named = dict(zip((name for name, _ in DECIDE.argv), decide_args(request), strict=True))
    assert named == {
        "now_ms": 11,
        "reservation_id": "r" * 32,
        "estimate_nano_usd": 13,
        "reservation_ttl_ms": 14,
        "session_ttl_ms": 15,
        "request_id": "req",
        "memo": "memo",
        "fingerprint": "ab" * 16,
        "dedup_ttl_ms": 17,
        "dedup_shadow": "1",
        "tool_call_count": 16,
        "tool_cap": 18,
        "tool_shadow": "0",
        "budget_cap_nano_usd": 19,
        "budget_strict": "1",
        "budget_shadow": "0",
        "decided": "m 13 20 21",
    }
