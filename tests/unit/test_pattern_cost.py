"""A tenant's pattern cost is bounded when policies are written, and per scanned entry."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import re2  # type: ignore[import-untyped]  # google-re2 ships no type information
from hypothesis import given, settings
from hypothesis import strategies as st
from spendgate_server.errors import InvalidArgument
from spendgate_server.policy.checks import scanned_text
from spendgate_server.policy.policies import (
    MAX_PATTERN_PROGRAM_SIZE,
    MAX_PATTERNS,
    MAX_SCANNED_BYTES_PER_ENTRY,
    MAX_TOTAL_PROGRAM_SIZE,
    compile_pattern,
    pattern_program_size,
    policies_from_dict,
)

# The kind of pattern that made the evaluator spend seconds per 32 KiB prompt: a
# 40,005-instruction program (RE2 accepts it; scanning is linear, but with a large factor).
HEAVY = ".{1000}" * 5 + "Z"


def refused_fields(raw: Mapping[str, object]) -> list[str]:
    with pytest.raises(InvalidArgument) as info:
        policies_from_dict(raw, "policies.")
    return [v.field for v in info.value.violations]


def test_the_issue_heavy_pattern_set_is_refused_naming_each_pattern_and_the_set() -> None:
    """100 patterns of 40k RE2 instructions each: every pattern and the set's total are named."""
    raw = {"banned_patterns": [{"id": f"p{i}", "pattern": HEAVY + str(i)} for i in range(100)]}
    fields = refused_fields(raw)
    assert fields == ["policies.banned_patterns"] + [
        f"policies.banned_patterns[{i}].pattern" for i in range(100)
    ]
    with pytest.raises(InvalidArgument) as info:
        policies_from_dict(raw, "policies.")
    total, first = info.value.violations[0].description, info.value.violations[1].description
    assert total.startswith("the patterns compile to 4000")
    assert first == "compiles to 40006 RE2 instructions, more than 2000 (use smaller repetition counts)"


def test_a_pattern_at_the_program_bound_is_accepted_and_one_above_is_refused() -> None:
    """`.{248}Z` compiles to 1,990 instructions, `.{250}Z` to 2,005: the bound is between them."""
    assert pattern_program_size(compile_pattern(".{248}Z")) <= MAX_PATTERN_PROGRAM_SIZE
    assert pattern_program_size(compile_pattern(".{250}Z")) > MAX_PATTERN_PROGRAM_SIZE
    policies_from_dict({"banned_patterns": [".{248}Z"]})
    assert refused_fields({"banned_patterns": ["ok", ".{250}Z"]}) == ["policies.banned_patterns[1].pattern"]


def test_the_set_total_and_count_are_bounded() -> None:
    """Ten 1,990-instruction patterns fit the 20,000 total; eleven do not; 101 small ones are too many."""
    ten = [f".{{248}}Z{i}" for i in range(10)]
    assert sum(pattern_program_size(compile_pattern(p)) for p in ten) <= MAX_TOTAL_PROGRAM_SIZE
    policies_from_dict({"banned_patterns": ten})
    assert refused_fields({"banned_patterns": [*ten, ".{248}Z10"]}) == ["policies.banned_patterns"]
    many = [f"word{i}" for i in range(MAX_PATTERNS + 1)]
    assert refused_fields({"banned_patterns": many}) == ["policies.banned_patterns"]


# Repetition-heavy and ordinary pieces, so sizes span both sides of the bounds.
_PIECES = st.sampled_from(["a", "[a-z]", r"\d", ".", "(ab|cd)", r"(\w+)", r"\s"])
_PATTERNS = st.builds(
    lambda piece, count, tail: f"{piece}{{{count}}}{tail}",
    _PIECES,
    st.integers(1, 400),
    st.sampled_from(["Z", "x9", "!"]),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(_PATTERNS, min_size=1, max_size=30, unique=True))
def test_a_set_is_accepted_exactly_when_re2s_own_program_sizes_fit(patterns: list[str]) -> None:
    """Differential against RE2's programsize: accepted iff each and the sum are within the bounds."""
    sizes = [re2.compile(p).programsize for p in patterns]
    fits = max(sizes) <= MAX_PATTERN_PROGRAM_SIZE and sum(sizes) <= MAX_TOTAL_PROGRAM_SIZE
    try:
        policies_from_dict({"banned_patterns": patterns})
    except InvalidArgument:
        assert not fits
    else:
        assert fits


@given(st.text(max_size=20_000), st.integers(0, 40_000))
def test_scanned_text_is_the_longest_whole_character_prefix_within_the_byte_bound(
    text: str, limit: int
) -> None:
    """The evaluator scans a prefix of at most ``limit`` UTF-8 bytes, cutting no character."""
    cut = scanned_text(text, limit)
    assert text.startswith(cut)
    assert len(cut.encode()) <= limit
    if cut != text:
        assert len(text[: len(cut) + 1].encode()) > limit


def test_scanned_text_defaults_to_the_journal_prompt_bound() -> None:
    """A 40 KiB entry is scanned to its first 32 KiB; a 4-byte character is never split."""
    assert MAX_SCANNED_BYTES_PER_ENTRY == 32 * 1024
    assert len(scanned_text("a" * 40_000)) == 32 * 1024
    emoji = "\N{GRINNING FACE}" * 9000  # 36,000 bytes
    assert scanned_text(emoji) == "\N{GRINNING FACE}" * 8192
