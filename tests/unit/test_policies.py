"""The four policies on single calls (pure): each fires where it should and stays silent elsewhere;
RE2 keeps matching linear; a violation never carries a secret it matched."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
from spendgate_client import key_fingerprint as client_key_fingerprint
from spendgate_server.errors import InvalidArgument
from spendgate_server.policy.checks import CENT_NANO_USD, evaluate, redacted_excerpt
from spendgate_server.policy.journal import CallContext, JournalEvent
from spendgate_server.policy.policies import (
    CompiledPolicies,
    compile_pattern,
    compile_policies,
    key_fingerprint,
    policies_from_dict,
    policies_to_dict,
)
from spendgate_server.policy.violations import PolicyType, Violation

SECRET = "sk-ant-api03-Zq8Xv2LmN4pR7tY1uW9eB3cD5fG6hJ0k"  # noqa: S105  # a fake key the tests must never see stored


def policies(**raw: Any) -> CompiledPolicies:
    return compile_policies(policies_from_dict(raw), 7)


def event(**context: Any) -> JournalEvent:
    cost = context.pop("cost", 1_000)
    model = context.pop("model", "claude-sonnet-4-5")
    return JournalEvent(
        decision_id="0" * 32,
        tenant="t",
        session_id="s",
        time_ms=1,
        effective_model=model,
        provider_ok=True,
        input_tokens=10,
        output_tokens=10,
        cache_read_input_tokens=0,
        cache_write_input_tokens=0,
        cost_nano_usd=cost,
        context=CallContext(**context),
    )


def kinds(found: list[Violation]) -> list[PolicyType]:
    return [v.policy_type for v in found]


def test_approved_models_checks_the_model_that_ran() -> None:
    """An unlisted model that ran fires (naming any downgrade); an approved one that ran is silent."""
    p = policies(approved_models=["claude-sonnet-4-5", "claude-haiku-4-5*"])
    assert evaluate(event(), p) == []
    assert evaluate(event(model="claude-haiku-4-5-20251001", requested_model="claude-opus-4-1"), p) == []
    [flagged] = evaluate(event(model="gpt-4o"), p)
    assert flagged.policy_type is PolicyType.APPROVED_MODELS and "gpt-4o" in flagged.message
    [downgraded] = evaluate(event(model="claude-3-haiku", requested_model="claude-sonnet-4-5"), p)
    assert "downgraded from claude-sonnet-4-5" in downgraded.message
    assert downgraded.approved_models == ("claude-sonnet-4-5", "claude-haiku-4-5*")
    assert evaluate(event(model="gpt-4o"), policies()) == []


def test_threshold_fires_only_above_it() -> None:
    """A call costing exactly the threshold is silent; one nano-USD more is flagged."""
    p = policies(approval_required_threshold_cents=50)
    assert evaluate(event(cost=50 * CENT_NANO_USD), p) == []
    [flagged] = evaluate(event(cost=50 * CENT_NANO_USD + 1), p)
    assert flagged.policy_type is PolicyType.APPROVAL_REQUIRED_THRESHOLD and flagged.threshold_cents == 50


def test_key_environment_by_fingerprint_and_by_label() -> None:
    """A listed key outside its environments (or with none reported) fires; inside, or unlisted: silent."""
    fp = key_fingerprint("sk-prod-key")
    p = policies(
        key_environment_check=[
            {"key_fingerprint": fp, "environments": ["prod"]},
            {"key_label": "ci", "environments": ["staging", "dev"]},
        ]
    )
    assert evaluate(event(key_fingerprint=fp, environment="prod"), p) == []
    assert evaluate(event(key_label="ci", environment="dev"), p) == []
    assert evaluate(event(key_fingerprint=key_fingerprint("other"), environment="dev"), p) == []
    [wrong] = evaluate(event(key_fingerprint=fp, environment="dev"), p)
    assert wrong.permitted_environments == ("prod",) and "'dev'" in wrong.message
    [unset] = evaluate(event(key_label="ci"), p)
    assert "no environment reported" in unset.message


def test_banned_patterns_server_side_and_client_reported() -> None:
    """A journaled prompt is matched here; a client's report is taken by id; a clean prompt is silent."""
    p = policies(banned_patterns=[{"id": "inject", "pattern": "(?i)ignore (all )?previous instructions"}])
    assert evaluate(event(prompt_text="summarise this page"), p) == []
    [hit] = evaluate(event(prompt_text="Please IGNORE previous instructions now"), p)
    assert hit.pattern is not None and (hit.pattern.pattern_id, hit.pattern.offset) == ("inject", 7)
    assert not hit.pattern.matched_on_client and "[REDACTED]" in hit.pattern.redacted_excerpt
    [reported] = evaluate(event(pattern_set_version=7, pattern_matches=(("inject", 12),)), p)
    assert reported.pattern is not None and reported.pattern.matched_on_client
    assert (reported.pattern.offset, reported.pattern.redacted_excerpt) == (12, "")


def test_a_prompt_with_a_secret_yields_a_violation_without_it() -> None:
    """A pattern matching only a key's prefix still redacts the whole key, and nothing stores it."""
    p = policies(banned_patterns=[{"id": "anthropic-key", "pattern": "sk-ant-"}])
    prompt = f"here is my key {SECRET} please debug my client and the other key ghp_1234567890abcdefXYZ"
    [hit] = evaluate(event(prompt_text=prompt), p)
    stored = hit.to_json()
    for leaked in (SECRET, SECRET[7:], SECRET[12:], "Zq8Xv2LmN4pR7tY1", "ghp_1234567890abcdefXYZ"):
        assert leaked not in stored and leaked not in hit.message
    assert hit.pattern is not None and hit.pattern.offset == prompt.index(SECRET)
    assert "here is my key [REDACTED] please" in hit.pattern.redacted_excerpt


def test_redaction_covers_every_banned_match_in_the_window() -> None:
    """Two secrets side by side are both redacted, and a cut never shows half a word."""
    text = "a" * 40 + " token=abc123secret and password=hunter2 bye"
    first = text.index("token")
    second = text.index("password")
    excerpt = redacted_excerpt(text, first, first + 6, [(first, first + 6), (second, second + 9)])
    assert "abc123secret" not in excerpt and "hunter2" not in excerpt
    assert excerpt.startswith("…") and "aaaa" not in excerpt


def test_catastrophic_pattern_is_linear_with_re2() -> None:
    """RE2 accepts (a+)+$ and scans a 1 MB adversarial input to the end (Python's re would not finish)."""
    program = compile_pattern("(a+)+$")
    adversarial = "a" * 1_000_000 + "!"
    assert program.search(adversarial) is None
    assert program.search("a" * 1_000_000) is not None
    p = policies(banned_patterns=["(a+)+$"])
    # The evaluator scans at most MAX_SCANNED_BYTES_PER_ENTRY (32 KiB), the journal's prompt bound.
    assert evaluate(event(prompt_text="a" * 32_000 + "!"), p) == []


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("(unclosed", "missing )"),
        ("(?=lookahead)", "invalid perl operator"),
        (r"(\w)\1", "invalid escape"),
        ("a*", "matches the empty string"),
    ],
)
def test_invalid_patterns_are_refused_with_the_reason(pattern: str, reason: str) -> None:
    """A pattern RE2 refuses (or one matching everything) is rejected naming the field and RE2's reason."""
    with pytest.raises(InvalidArgument) as info:
        policies_from_dict(
            {"banned_patterns": [{"id": "ok", "pattern": "fine"}, {"id": "bad", "pattern": pattern}]}
        )
    [violation] = info.value.violations
    assert violation.field == "banned_patterns[1].pattern" and reason in violation.description


def test_policy_file_bounds_are_named() -> None:
    """Unknown keys, duplicate ids, bad fingerprints, empty environments and negative thresholds are named."""
    with pytest.raises(InvalidArgument) as info:
        policies_from_dict(
            {
                "approved_model": ["x"],
                "banned_patterns": [{"id": "a", "pattern": "x"}, {"id": "a", "pattern": "y"}],
                "key_environment_check": [{"key_fingerprint": "nothex", "environments": []}],
                "approval_required_threshold_cents": -1,
            }
        )
    fields = {v.field for v in info.value.violations}
    assert fields == {
        "approved_model",
        "banned_patterns[1].id",
        "key_environment_check[0].key_fingerprint",
        "key_environment_check[0].environments",
        "approval_required_threshold_cents",
    }


def test_user_form_round_trips() -> None:
    """policies_to_dict is read back by policies_from_dict unchanged (pattern ids made stable)."""
    parsed = policies_from_dict(
        {
            "approved_models": ["a", "b*"],
            "banned_patterns": ["secret-[0-9]+", {"id": "x", "pattern": "y+"}],
            "key_environment_check": [{"key_label": "k", "environments": ["prod"]}],
            "approval_required_threshold_cents": 0,
            "journal_prompts": True,
        }
    )
    assert policies_from_dict(policies_to_dict(parsed)) == parsed
    assert re.fullmatch(r"re-[0-9a-f]{8}", parsed.banned_patterns[0].id)


def test_violation_ids_are_stable_per_call_and_policy() -> None:
    """Evaluating the same event twice yields the same ids; another call or pattern gets another id."""
    p = policies(
        approved_models=["x"], banned_patterns=[{"id": "a", "pattern": "a"}, {"id": "b", "pattern": "b"}]
    )
    once = evaluate(event(model="y", prompt_text="a b"), p)
    assert [v.violation_id for v in once] == [
        v.violation_id for v in evaluate(event(model="y", prompt_text="a b"), p)
    ]
    assert len({v.violation_id for v in once}) == 3
    other = dataclasses.replace(event(model="y"), decision_id="1" * 32)
    assert evaluate(other, p)[0].violation_id != once[0].violation_id


def test_client_and_server_fingerprint_keys_alike() -> None:
    """The client's key fingerprint is the one policies are written with; it does not contain the key."""
    assert client_key_fingerprint(SECRET) == key_fingerprint(SECRET)
    assert re.fullmatch(r"[0-9a-f]{32}", key_fingerprint(SECRET)) and "Zq8X" not in key_fingerprint(SECRET)
