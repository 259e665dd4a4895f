"""Bounds on what people hand the server: documents, config and policy values, error details.

Property tests: whatever JSON-like value a config or policy file holds, parsing it ends in
a value or an InvalidArgument naming fields, never another exception; a document's measured
depth is its real depth; an error's details stay small whatever the number of bad fields.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import yaml
from google.rpc import error_details_pb2
from hypothesis import given, settings
from hypothesis import strategies as st
from spendgate_server.documents import MAX_DOCUMENT_DEPTH, MAX_DOCUMENT_VALUES, parse_document
from spendgate_server.engine.config import CONFIG_KEYS, parse_enforcement_config
from spendgate_server.errors import ConfigError, FieldViolation, InvalidArgument
from spendgate_server.money import usd_to_nano
from spendgate_server.policy.policies import policies_from_dict
from spendgate_server.rpc.status import rpc_status
from spendgate_server.rpc.validation import cursor_from_proto

POLICY_KEYS = (
    "approved_models",
    "banned_patterns",
    "key_environment_check",
    "approval_required_threshold_cents",
    "journal_prompts",
)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    scalars | st.sampled_from(["1e999999", "-1e999999", "NaN", "Infinity", "crossing", "strict"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def outcome(call: Callable[[], Any]) -> Any:
    """What ``call`` returns, or the InvalidArgument/ConfigError it raises (any other escapes)."""
    try:
        return call()
    except (InvalidArgument, ConfigError) as exc:
        return exc


def depth_of(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    return 0


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from([*CONFIG_KEYS, "other"]), json_values, max_size=6))
def test_any_config_value_is_accepted_or_named(raw: dict[str, Any]) -> None:
    """parse_enforcement_config on any JSON-like values: a config, or InvalidArgument naming a key."""
    refused = outcome(lambda: parse_enforcement_config(raw))
    if isinstance(refused, InvalidArgument):
        assert refused.violations and all(v.field.split(".")[0] in raw for v in refused.violations)


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from([*POLICY_KEYS, "other"]), json_values, max_size=5))
def test_any_policy_value_is_accepted_or_named(raw: dict[str, Any]) -> None:
    """policies_from_dict on any JSON-like values: policies, or InvalidArgument naming a key."""
    refused = outcome(lambda: policies_from_dict(raw))
    if isinstance(refused, InvalidArgument):
        assert refused.violations
        assert all(v.field.split(".")[0].split("[")[0] in raw for v in refused.violations)


@given(json_values)
def test_measured_depth_is_the_real_depth(value: Any) -> None:
    """Both the YAML event scan and the JSON bracket scan measure a document's real nesting."""
    text = json.dumps(value)
    expected_ok = depth_of(value) <= MAX_DOCUMENT_DEPTH
    for json_only in (True, False):
        parsed = outcome(partial(parse_document, text, "doc", json_only=json_only))
        if isinstance(parsed, ConfigError):
            assert not expected_ok or "not valid" in str(parsed)
        else:
            assert expected_ok
            if json_only:
                # Compared as text: a float NaN is never equal to itself.
                assert json.dumps(parsed) == text


@pytest.mark.parametrize("json_only", [True, False])
def test_depth_just_past_the_bound_is_refused(json_only: bool) -> None:
    """At the bound a document parses; one level deeper it is refused in one line."""
    at_bound = "[" * MAX_DOCUMENT_DEPTH + "]" * MAX_DOCUMENT_DEPTH
    assert depth_of(parse_document(at_bound, "doc", json_only=json_only)) == MAX_DOCUMENT_DEPTH
    with pytest.raises(ConfigError, match=f"doc: nested deeper than {MAX_DOCUMENT_DEPTH} levels"):
        parse_document("[" + at_bound + "]", "doc", json_only=json_only)


def test_brackets_inside_json_strings_are_not_nesting() -> None:
    """Only structure counts: a string full of brackets (escaped quotes included) is depth 1."""
    text = json.dumps({"a": "[" * 100 + '\\"[{' * 50})
    assert parse_document(text, "doc", json_only=True) == json.loads(text)


def test_yaml_aliases_parse_but_billion_laughs_is_refused() -> None:
    """Aliases that share a value parse; aliases of aliases expanding past the bound are refused."""
    assert parse_document("a: &x [1, 2]\nb: *x\n", "doc") == {"a": [1, 2], "b": [1, 2]}
    levels = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    with pytest.raises(ConfigError, match=f"expands to more than {MAX_DOCUMENT_VALUES} values"):
        parse_document("\n".join(levels), "doc")
    deep = "a: &a " + "[" * 20 + "]" * 20 + "\nb: " + "[" * 20 + "*a" + "]" * 20
    with pytest.raises(ConfigError, match=f"nested deeper than {MAX_DOCUMENT_DEPTH} levels"):
        parse_document(deep, "doc")


@pytest.mark.parametrize("amount", ["1e999999", "-1e999999", "1e15", "-1e15"])
def test_dollar_amounts_far_out_of_range_are_value_errors(amount: str) -> None:
    """No amount overflows the decimal context: out of range is a ValueError before any arithmetic."""
    from decimal import Decimal

    with pytest.raises(ValueError, match="out of range"):
        usd_to_nano(Decimal(amount))
    assert usd_to_nano(Decimal("999999999999999")) == 999_999_999_999_999 * 10**9


@pytest.mark.parametrize("count", [1, 10, 100, 30_000])
@pytest.mark.parametrize("long_text", [False, True])
def test_error_details_stay_under_the_clients_metadata_limit(count: int, long_text: bool) -> None:
    """Whatever the violations, message plus base64 details stay under 8 KiB (grpc's soft limit)."""
    size = 5000 if long_text else 10
    violations = [FieldViolation(f"field[{i}]" + "x" * size, "d" * size) for i in range(count)]
    _, status = rpc_status(InvalidArgument(violations))
    assert len(status.message.encode()) + len(status.SerializeToString()) * 4 // 3 < 8 * 1024 - 512
    request = error_details_pb2.BadRequest()
    assert status.details[1].Unpack(request)
    shown = request.field_violations
    if len(shown) < count:
        assert shown[-1].description == f"... and {count - len(shown) + 1} more problems (fix these first)"


def test_yaml_module_parses_json_documents_the_same() -> None:
    """The YAML path also reads JSON files, so a document's format does not change what it means."""
    text = json.dumps({"enforcement": {"token_ceiling": 10, "shadow": ["token_ceiling"]}})
    assert parse_document(text, "doc") == yaml.safe_load(text) == json.loads(text)


@given(st.integers(min_value=0, max_value=2**65), st.integers(min_value=0, max_value=2**65))
def test_a_cursor_is_accepted_exactly_when_it_is_a_stream_id(ms: int, seq: int) -> None:
    """<ms>-<seq> is a feed cursor exactly when both parts are below 2**64, the largest id included."""
    cursor = f"{ms}-{seq}"
    if ms < 2**64 and seq < 2**64:
        assert cursor_from_proto(cursor) == cursor
    else:
        with pytest.raises(InvalidArgument) as info:
            cursor_from_proto(cursor)
        assert [v.field for v in info.value.violations] == ["cursor"]


def test_the_largest_stream_id_is_a_cursor() -> None:
    """18446744073709551615-18446744073709551615 (was refused) is the largest valid cursor."""
    largest = "18446744073709551615-18446744073709551615"
    assert cursor_from_proto(largest) == largest
