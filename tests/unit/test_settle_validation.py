"""settle_from_proto's context cache: a settle is checked and built as without it, whatever came before."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from spendgate.v1 import decision_pb2 as pb
from spendgate_server.engine.decide import SettleCall
from spendgate_server.errors import InvalidArgument
from spendgate_server.rpc import validation
from spendgate_server.rpc.validation import settle_from_proto

# Valid and invalid values of each context field (bounds in rpc/validation.py BOUNDS).
contexts = st.fixed_dictionaries(
    {
        "requested_model": st.sampled_from(["", "gpt-4o", "claude-sonnet-4-5", "bad model", "x" * 129]),
        "verdict": st.sampled_from([0, pb.VERDICT_ALLOW, pb.VERDICT_ALLOW_DOWNGRADED, pb.VERDICT_BLOCK, 99]),
        "project": st.sampled_from(["", "web", "bad project"]),
        "key_fingerprint": st.sampled_from(["", "0" * 32, "ABC"]),
        "key_label": st.sampled_from(["", "ci", "bad label"]),
        "environment": st.sampled_from(["", "prod", "x" * 33]),
        "prompt_text": st.sampled_from(["", "hello"]),
        "prompt_truncated": st.booleans(),
        "pattern_set_version": st.sampled_from([0, 3, -1]),
        "pattern_matches": st.sampled_from([[], [("ssn", 4)], [("bad id", 1)]]),
    }
)


def request(fields: dict[str, object]) -> pb.SettleRequest:
    settle = pb.SettleRequest(
        session_id="s",
        reservation_id="0" * 32,
        model="gpt-4o",
        usage=pb.Usage(input_tokens=100, output_tokens=10),
        outcome=pb.PROVIDER_OUTCOME_OK,
    )
    for name, value in fields.items():
        if name == "pattern_matches":
            assert isinstance(value, list)
            settle.pattern_matches.extend(pb.PatternMatch(pattern_id=p, offset=o) for p, o in value)
        else:
            setattr(settle, name, value)
    return settle


def uncached(settle: pb.SettleRequest) -> SettleCall | list[tuple[str, str]]:
    """The reference: the same validation with the cache emptied first."""
    validation._CONTEXTS.clear()
    return outcome(settle)


def outcome(settle: pb.SettleRequest) -> SettleCall | list[tuple[str, str]]:
    try:
        return settle_from_proto(settle, "t")
    except InvalidArgument as exc:
        return [(v.field, v.description) for v in exc.violations]


@given(st.lists(contexts, min_size=1, max_size=12))
def test_a_settle_is_validated_as_without_the_cache(sequence: list[dict[str, object]]) -> None:
    """Each settle of a sequence (contexts repeating, valid or not) gets what a fresh server gives it:
    the same SettleCall, or the same violations, never a context remembered from a refused one."""
    validation._CONTEXTS.clear()
    for fields in sequence:
        settle = request(fields)
        cached = outcome(settle)
        assert cached == outcome(settle)  # asked again, now from the cache where it was kept
        state = dict(validation._CONTEXTS)
        assert cached == uncached(settle)
        validation._CONTEXTS.update(state)


def test_the_cache_keeps_valid_contexts_only_and_stays_bounded() -> None:
    validation._CONTEXTS.clear()
    settle_from_proto(request({"requested_model": "gpt-4o", "verdict": pb.VERDICT_ALLOW}), "t")
    assert len(validation._CONTEXTS) == 1
    with pytest.raises(InvalidArgument) as refused:
        settle_from_proto(request({"project": "bad project"}), "t")
    assert [v.field for v in refused.value.violations] == ["project"]
    assert len(validation._CONTEXTS) == 1
    for n in range(validation._MAX_CONTEXTS + 5):
        settle_from_proto(request({"project": f"p{n}"}), "t")
    assert len(validation._CONTEXTS) <= validation._MAX_CONTEXTS
