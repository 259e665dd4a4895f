"""What the CLI and the server say about a malformed API key: the fault in words, never the key."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from spendgate_server.store.keys import Scope, key_problem, new_key, parse_key

KEY = new_key("acme", Scope.CLIENT, "agent", 0)[0]
SECRET = KEY[13:]  # after "sgk_", the 8-digit id and "_"

mutations = st.one_of(
    st.text(max_size=80),
    st.integers(0, len(KEY)).map(lambda n: KEY[:n]),
    st.text(max_size=4).map(lambda extra: KEY + extra),
    st.tuples(st.integers(0, len(KEY) - 1), st.characters()).map(
        lambda t: KEY[: t[0]] + t[1] + KEY[t[0] + 1 :]
    ),
    st.sampled_from(["Bearer ", "bearer ", " ", "'", '"', "sk-"]).map(lambda prefix: prefix + KEY),
)


@given(mutations)
def test_a_problem_is_named_exactly_when_the_key_is_malformed(presented: str) -> None:
    """key_problem answers for every key parse_key refuses, and for no other."""
    assert (key_problem(presented) is None) == (parse_key(presented) is not None)


@given(mutations)
def test_a_problem_never_repeats_the_key(presented: str) -> None:
    """The words describe the key's shape; no part of its secret appears in them."""
    problem = key_problem(presented) or ""
    assert SECRET[:8] not in problem and SECRET[-8:] not in problem


def test_the_common_mistakes_are_named() -> None:
    """Bearer twice, a key cut short, a provider's key, quotes: each gets its own words."""
    assert key_problem(KEY) is None
    assert "starts with 'Bearer '" in (key_problem("Bearer " + KEY) or "")
    assert key_problem(KEY[:-2]) == (
        "the secret after the key id has 41 characters instead of 43: "
        "was the key cut short or joined to something?"
    )
    assert "provider's API key" in (key_problem("sk-ant-api03-abc") or "")
    assert "spaces or quotes" in (key_problem(f"'{KEY}'") or "")
    assert key_problem("") == "it is empty"
    assert key_problem(KEY[:12] + "_") == "the secret after the key id is missing"
