"""The table of rule units: complete, documented, and every form of a config round-trips through it."""

from __future__ import annotations

from pathlib import Path

import spendgate_client
from hypothesis import given
from hypothesis import strategies as st
from spendgate_server.console.rules_form import RULE_KEYS, form_values, parse_rules_form
from spendgate_server.engine.config import (
    CONFIG_KEYS,
    BudgetMode,
    EnforcementConfig,
    ModelDowngrade,
    Rule,
    config_to_dict,
    parse_enforcement_config,
)
from spendgate_server.engine.rules import RULE_UNITS, STATEFUL_RULES, STATELESS_RULES, rules_table_markdown
from spendgate_server.rpc.validation import config_from_proto
from spendgate_server.rpc.wire import config_to_proto

README = Path(__file__).resolve().parents[2] / "README.md"

configs = st.builds(
    EnforcementConfig,
    token_ceiling=st.one_of(st.none(), st.integers(1, 10_000_000)),
    max_session_nano_usd=st.one_of(st.none(), st.integers(0, 10**15)),
    budget_mode=st.sampled_from(BudgetMode),
    dedup_ttl_seconds=st.one_of(st.none(), st.integers(1, 7 * 24 * 3600)),
    max_tool_calls=st.one_of(st.none(), st.integers(0, 1_000_000)),
    model_downgrade=st.one_of(
        st.none(),
        st.builds(
            ModelDowngrade, st.integers(0, 10**15), st.sampled_from(["claude-haiku-4-5", "gpt-4o-mini"])
        ),
    ),
    shadow_rules=st.frozensets(st.sampled_from(Rule)),
)


def test_one_unit_per_rule_in_wire_order() -> None:
    """Every rule has exactly one unit, listed in wire-code order; stateless and stateful split them."""
    assert [unit.rule for unit in RULE_UNITS] == sorted(Rule)
    assert {u.rule for u in STATELESS_RULES} | {u.rule for u in STATEFUL_RULES} == set(Rule)
    assert [u.rule for u in STATELESS_RULES] == [Rule.TOKEN_CEILING, Rule.MODEL_DOWNGRADE]


def test_config_keys_and_console_sections_come_from_the_units() -> None:
    """The accepted keys and the console's fieldsets are the units' own."""
    assert CONFIG_KEYS == (
        "token_ceiling",
        "max_session_usd",
        "budget_mode",
        "dedup_ttl_seconds",
        "max_tool_calls",
        "model_downgrade",
        "shadow",
    )
    assert tuple(unit.key for unit in RULE_UNITS) == RULE_KEYS


def test_readme_rules_table_is_the_generated_one() -> None:
    """The README's rules table is exactly what the units document (``python -m ...engine.rules``)."""
    assert rules_table_markdown() in README.read_text()


@given(configs)
def test_user_facing_form_round_trips(config: EnforcementConfig) -> None:
    """config_to_dict then parse_enforcement_config gives the same config back."""
    assert parse_enforcement_config(config_to_dict(config)) == config


@given(configs)
def test_wire_form_round_trips(config: EnforcementConfig) -> None:
    """config_to_proto then config_from_proto gives the same config back."""
    assert config_from_proto(config_to_proto(config)) == config


@given(configs)
def test_console_form_round_trips(config: EnforcementConfig) -> None:
    """The console form shows a config and, submitted unchanged, parses back to it."""
    values = form_values(config_to_dict(config))
    form = {name: [value] for name, value in values.items() if name != "shadow"}
    form["shadow"] = sorted(values["shadow"])
    parsed, errors = parse_rules_form(form)
    assert errors == {}
    assert parsed == config


@given(configs, configs)
def test_merge_is_never_looser_than_an_enforced_side(a: EnforcementConfig, b: EnforcementConfig) -> None:
    """Each enforced limit of either side holds in the merge, and merging with itself changes nothing."""
    merged = a.stricter(b)
    for side in (a, b):
        if side.token_ceiling is not None and not side.is_shadow(Rule.TOKEN_CEILING):
            assert merged.token_ceiling is not None and merged.token_ceiling <= side.token_ceiling
            assert not merged.is_shadow(Rule.TOKEN_CEILING)
        if side.max_session_nano_usd is not None and not side.is_shadow(Rule.SESSION_BUDGET):
            assert merged.max_session_nano_usd is not None
            assert merged.max_session_nano_usd <= side.max_session_nano_usd
        if side.dedup_ttl_seconds is not None and not side.is_shadow(Rule.DUPLICATE_REQUEST):
            assert merged.dedup_ttl_seconds is not None and merged.dedup_ttl_seconds >= side.dedup_ttl_seconds
        if side.max_tool_calls is not None and not side.is_shadow(Rule.TOOL_CALL_LIMIT):
            assert merged.max_tool_calls is not None and merged.max_tool_calls <= side.max_tool_calls
        if side.model_downgrade is not None and not side.is_shadow(Rule.MODEL_DOWNGRADE):
            assert merged.model_downgrade is not None
            assert merged.model_downgrade.threshold_nano_usd <= side.model_downgrade.threshold_nano_usd
        if side.budget_mode is BudgetMode.STRICT:
            assert merged.budget_mode is BudgetMode.STRICT
    assert a.stricter(a) == a.stricter(a).stricter(a)


def test_each_blocking_rule_names_the_client_error_that_carries_its_key() -> None:
    """A unit's client_error is a spendgate_client exception whose ``rule`` is the unit's key."""
    for unit in RULE_UNITS:
        if not unit.client_error:
            continue  # a downgrade never blocks
        error = getattr(spendgate_client, unit.client_error)
        assert issubclass(error, spendgate_client.EnforcementError)
        assert error.rule == unit.key
    assert {u.rule for u in RULE_UNITS if not u.client_error} == {Rule.MODEL_DOWNGRADE}
