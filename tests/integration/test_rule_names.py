"""One name per rule wherever users see it: the config key (``token_ceiling`` …), never the wire enum's.

The wire enum (``spendgate.v1.Rule``) stays as it is; the server's ``Rule.key`` is the name,
and the CLI, both clients' errors, the metrics labels and the console all show it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import spendgate_client
from prometheus_client import CollectorRegistry
from spendgate.v1 import decision_pb2 as pb
from spendgate_client import _client as client_module
from spendgate_client import _config as client_config
from spendgate_server.console.pages.sessions import session_card
from spendgate_server.engine.config import CONFIG_KEYS
from spendgate_server.engine.decide import Decision, Verdict
from spendgate_server.metrics import Metrics
from spendgate_server.rule_codes import Rule
from spendgate_server.store.insights import SessionSummary

from tests.processes import SpendgateServer

ROOT = Path(__file__).resolve().parents[2]
NAMES = {rule: rule.key for rule in Rule}
BLOCKING_ERRORS = {
    Rule.TOKEN_CEILING: spendgate_client.TokenCeilingExceeded,
    Rule.SESSION_BUDGET: spendgate_client.SessionBudgetExceeded,
    Rule.DUPLICATE_REQUEST: spendgate_client.DuplicateRequest,
    Rule.TOOL_CALL_LIMIT: spendgate_client.ToolCallLimitExceeded,
}


def test_each_name_is_a_config_key_and_the_wire_enum_is_unchanged() -> None:
    """Every rule's name is a key users write in a config; the wire codes are the v1 enum's."""
    assert set(NAMES.values()) <= set(CONFIG_KEYS)
    for rule in Rule:
        assert pb.Rule.Value(f"RULE_{rule.name}") == rule.value


def test_python_client_uses_the_names() -> None:
    """The Python client's Decision.rule, shadow rules and exc.rule are the config keys."""
    for rule, key in NAMES.items():
        assert client_module._RULE_KEYS[pb.Rule.ValueType(rule.value)] == key
        assert client_config._RULES[key] == rule.value
    for rule, error in BLOCKING_ERRORS.items():
        assert error.rule == rule.key
        assert error("why", "d1").rule == rule.key


def test_node_client_uses_the_names() -> None:
    """The Node client maps each wire enum name to the same key, and its errors carry it."""
    config = (ROOT / "clients/node/src/config.ts").read_text()
    table = config[config.index("export const RULE_KEYS") :].split("};", 1)[0]
    mapped = dict(re.findall(r"(RULE_[A-Z_]+): '([a-z_]+)'", table))
    assert mapped == {f"RULE_{rule.name}": key for rule, key in NAMES.items()}
    errors = (ROOT / "clients/node/src/errors.ts").read_text()
    for rule, error in BLOCKING_ERRORS.items():
        assert re.search(
            rf"class {error.__name__} [^{{]*\{{\s*static override readonly RULE = '{rule.key}'", errors
        )


def _decision(verdict: Verdict, rule: Rule | None, shadow: frozenset[Rule] = frozenset()) -> Decision:
    return Decision(verdict, "claude-sonnet-4-5", rule, "why", "d", "", 0, 0, None, 0, shadow)


def test_metrics_label_rules_by_their_names() -> None:
    """spendgate_decisions_total{rule} and spendgate_shadow_would_block_total{rule} use the names."""
    metrics = Metrics(CollectorRegistry())
    for rule in Rule:
        metrics.decided(_decision(Verdict.BLOCK, rule, frozenset({rule})), 0.001)
    labels = {
        (sample.name, sample.labels["rule"])
        for family in metrics.registry.collect()
        for sample in family.samples
        if "rule" in sample.labels and sample.name.endswith("_total")
    }
    for key in NAMES.values():
        assert ("spendgate_decisions_total", key) in labels
        assert ("spendgate_shadow_would_block_total", key) in labels
    assert {label for _, label in labels} == set(NAMES.values())


def test_console_sessions_name_blocks_by_rule_key() -> None:
    """The Sessions page lists blocked calls under each rule's key."""
    summary = SessionSummary("s", "", 0, None, 9, {rule: rule.value for rule in Rule}, 0)
    assert {key for _, key, _ in session_card(summary, None).blocked} == set(NAMES.values())


@pytest.mark.parametrize(
    ("config", "flags", "rule"),
    [
        ('{"token_ceiling": 10}', [], "token_ceiling"),
        ('{"max_session_usd": 0}', [], "max_session_usd"),
        ('{"max_tool_calls": 0}', ["--tool-calls", "1"], "max_tool_calls"),
    ],
)
def test_cli_prints_rule_names(
    spendgate: Callable[..., SpendgateServer], config: str, flags: list[str], rule: str
) -> None:
    """`spendgate decide` prints rule=<config key> for a block."""
    server = spendgate()
    argv = [sys.executable, "-m", "spendgate_server", "decide", "--target", server.target, "--session", "s"]
    result = subprocess.run(
        [*argv, "--model", "claude-sonnet-4-5", "--config", config, *flags],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 3
    assert result.stdout.startswith(f"BLOCK  rule={rule}  model=claude-sonnet-4-5  reason: ")


def test_cli_names_a_duplicate_dedup_ttl_seconds(spendgate: Callable[..., SpendgateServer]) -> None:
    """The README's duplicate example: rule=dedup_ttl_seconds, not the wire's duplicate_request."""
    server = spendgate()
    argv = [sys.executable, "-m", "spendgate_server", "decide", "--target", server.target, "--session", "d"]
    argv += ["--model", "claude-sonnet-4-5", "--prompt", "hi", "--config", '{"dedup_ttl_seconds": 60}']
    first = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    second = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert first.returncode == 0 and first.stdout.startswith("ALLOW  rule=-  ")
    assert second.returncode == 3 and second.stdout.startswith("BLOCK  rule=dedup_ttl_seconds  ")
