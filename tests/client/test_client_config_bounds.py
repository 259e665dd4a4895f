"""The client refuses an enforcement_config the server would refuse, when the client is made.

Else every call would raise INVALID_ARGUMENT (fail mode does not apply to a refused request).
The client is installable alone and keeps its own copy of the bounds: each field is
compared with the server's validation of the wire message (rpc/validation.py).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from spendgate.v1 import decision_pb2 as pb
from spendgate_client import JournaledAnthropic, enforcement_config_to_proto
from spendgate_client._config import INT_BOUNDS, MAX_USD_NANO
from spendgate_server.errors import InvalidArgument
from spendgate_server.rpc.validation import config_from_proto

INT64 = 2**63 - 1
NANO = 1_000_000_000


def _server_refuses(message: pb.EnforcementConfig) -> bool:
    try:
        config_from_proto(message)
    except InvalidArgument:
        return True
    return False


def _client_refuses(config: dict[str, Any]) -> bool:
    try:
        enforcement_config_to_proto(config)
    except ValueError:
        return True
    return False


def _near(*bounds: int) -> st.SearchStrategy[int]:
    """Integers at, beside and between ``bounds``, within the wire's int64."""
    edges = [v for b in bounds for v in (b - 1, b, b + 1) if -INT64 <= v <= INT64]
    return st.sampled_from(edges) | st.integers(-INT64, INT64)


def test_the_copy_covers_every_integer_rule_of_the_server() -> None:
    """Each integer field the server bounds has its bounds in the client's copy, and the same."""
    from spendgate_server.engine.rules import RULE_UNITS
    from spendgate_server.engine.rules._unit import IntegerRule

    server = {unit.key: (unit.low, unit.high) for unit in RULE_UNITS if isinstance(unit, IntegerRule)}
    assert server == INT_BOUNDS


@given(st.sampled_from(sorted(INT_BOUNDS)), st.data())
def test_integer_fields_are_judged_alike(key: str, data: st.DataObject) -> None:
    """Differential: the client refuses an integer rule exactly when the server does."""
    value = data.draw(_near(*INT_BOUNDS[key], 0))
    message = pb.EnforcementConfig()
    setattr(message, key, value)
    assert _client_refuses({key: value}) == _server_refuses(message)


@given(_near(0, MAX_USD_NANO))
def test_dollar_amounts_are_judged_alike(nano_usd: int) -> None:
    """Differential: max_session_usd and model_downgrade.threshold_usd, as exact dollars."""
    usd = Decimal(nano_usd).scaleb(-9)
    assert _client_refuses({"max_session_usd": usd}) == _server_refuses(
        pb.EnforcementConfig(max_session_nano_usd=nano_usd)
    )
    downgrade = {"threshold_usd": usd, "fallback": "gpt-4o-mini"}
    assert _client_refuses({"model_downgrade": downgrade}) == _server_refuses(
        pb.EnforcementConfig(
            model_downgrade=pb.ModelDowngrade(threshold_nano_usd=nano_usd, fallback_model="gpt-4o-mini")
        )
    )


@given(st.text(max_size=140) | st.sampled_from(["gpt-4o-mini", "a" * 128, "a" * 129, "", "a b", "é"]))
def test_fallback_model_names_are_judged_alike(name: str) -> None:
    """Differential: the downgrade's fallback model name."""
    client = _client_refuses({"model_downgrade": {"threshold_usd": 1, "fallback": name}})
    server = _server_refuses(
        pb.EnforcementConfig(model_downgrade=pb.ModelDowngrade(threshold_nano_usd=NANO, fallback_model=name))
    )
    assert client == server


@given(st.lists(st.sampled_from(["token_ceiling", "max_session_usd", "max_tool_calls"]), max_size=40))
def test_a_shadow_list_the_client_accepts_the_server_accepts(rules: list[str]) -> None:
    """A rule named twice is sent once: a long list never makes every call refused."""
    message = enforcement_config_to_proto({"shadow": rules})
    assert not _server_refuses(message)


def test_the_issue_input_is_refused_when_the_wrapper_is_made() -> None:
    """max_session_usd 5,000,000 is over the server's one million dollars: ValueError at once."""
    with pytest.raises(ValueError, match="max_session_usd") as info:
        JournaledAnthropic(
            api_key="sk-ant-test",
            session_id="big",
            enforcement_config={"max_session_usd": 5_000_000},
            spendgate_target="127.0.0.1:1",
        )
    assert str(info.value) == (
        "enforcement_config['max_session_usd'] must be a number of US dollars from 0 to 1000000, got 5000000"
    )
    assert not _server_refuses(enforcement_config_to_proto({"max_session_usd": 1_000_000}))
