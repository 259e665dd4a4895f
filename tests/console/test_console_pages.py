"""Web console, phase 2: the Policies, Violations (paged and live) and Sessions pages; their gRPC backend.

Handlers run in process (Starlette's TestClient) against test_console.py's in-memory fake
of the backend; the backend's new calls and the live feed's resume are tested against a
real ``spendgate serve`` (its embedded evaluator on the memory store).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from spendgate_client import DecisionClient
from spendgate_server.console.app import create_app
from spendgate_server.console.backend import (
    BackendError,
    BackendUnavailable,
    EditConflict,
    GrpcBackend,
    InvalidInput,
    NotAuthorized,
)
from spendgate_server.console.charts import MAX_BARS, MIN_SPAN_MINUTES, spend_chart
from spendgate_server.console.pages import violations as violations_page
from spendgate_server.console.pages.sessions import session_card
from spendgate_server.console.policies_form import errors_from, form_values, parse_policies_form
from spendgate_server.console.violation_groups import summarize
from spendgate_server.engine.config import Rule
from spendgate_server.errors import FieldViolation
from spendgate_server.money import format_usd
from spendgate_server.policy.policies import BannedPattern, Policies, policies_from_dict, policies_to_dict
from spendgate_server.policy.violations import PatternHit, PolicyType, Violation, ViolationFilter
from spendgate_server.store.insights import MINUTE_MS, SessionSummary, SpendPoint
from starlette.testclient import TestClient

from tests.conftest import FakeClock
from tests.console.test_console import ORIGIN, FakeBackend, field_block, make_client, sign_in, token_of
from tests.fake_provider import PRICES_YAML, new_session
from tests.processes import SpendgateServer

SECRET = "sk-live-Zq8Xv2LmN4pR7tY1uW9eB3cD5fG6hJ0kQ"  # noqa: S105  # fake: the pages must never show it
BASE_MS = 1_800_000_000_000
DEADLINE_SECONDS = 15.0

Harness = tuple[TestClient, FakeBackend, FakeClock]


@pytest.fixture
def harness() -> Iterator[Harness]:
    backend, clock = FakeBackend(), FakeClock()
    with make_client(backend, clock) as client:
        yield client, backend, clock


@pytest.fixture
def signed_in(harness: Harness) -> Harness:
    sign_in(harness[0])
    return harness


def hidden_fields(html: str, form_class: str) -> dict[str, str]:
    form = html.split(f'class="{form_class}"')[1].split("</form>")[0]
    return dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', form))


def policies_form(client: TestClient, typed: dict[str, str]) -> dict[str, str]:
    """The Policies form as loaded (hidden fields included), with ``typed`` values over it."""
    return {**hidden_fields(client.get("/policies").text, "policies"), **typed}


def post_policies(client: TestClient, form: dict[str, str], **headers: str) -> Any:
    return client.post("/policies", data=form, headers={"origin": ORIGIN, **headers})


def violation(
    i: int,
    policy_type: PolicyType = PolicyType.APPROVED_MODELS,
    *,
    session: str = "s1",
    project: str = "web",
    **fields: Any,
) -> Violation:
    """The i-th violation of a fake feed (cursors of equal width, so they order as strings)."""
    values: dict[str, Any] = {
        "violation_id": f"{i:032x}",
        "policy_type": policy_type,
        "message": f"model m{i} ran and is not in approved_models",
        "call_time_ms": BASE_MS + i * 1000,
        "decision_id": f"{i:032x}",
        "session_id": session,
        "project": project,
        "requested_model": f"m{i}",
        "effective_model": f"m{i}",
        "environment": "",
        "key_fingerprint": "",
        "key_label": "",
        "cost_nano_usd": 12_000_000,
        "policy_version": 1,
        "cursor": f"{BASE_MS + i * 1000}-0",
        **fields,
    }
    return Violation(**values)


def events(lines: Iterator[str], count: int) -> list[dict[str, str]]:
    """The next ``count`` server-sent events (comments and retry fields skipped)."""
    found: list[dict[str, str]] = []
    event: dict[str, str] = {}
    for line in lines:
        if not line:
            if "event" in event:
                found.append(event)
                if len(found) == count:
                    return found
            event = {}
        elif not line.startswith((":", "retry:")):
            name, _, value = line.partition(": ")
            event[name] = f"{event[name]}\n{value}" if name == "data" and name in event else value
    return found


# --- refusals


def test_new_pages_refuse_requests_without_a_session(harness: Harness) -> None:
    """Signed out, pages redirect to sign-in, the live feed is a bare 401, a policy post changes nothing."""
    client, backend, _ = harness
    for path in ("/policies", "/policies/history", "/violations", "/sessions"):
        response = client.get(path)
        assert response.status_code == 303 and response.headers["location"] == f"/signin?next={path}"
    stream = client.get("/violations/stream")
    assert stream.status_code == 401 and stream.headers["content-type"].startswith("text/plain")
    response = client.post("/policies", data={"approved_models": "x"}, headers={"origin": ORIGIN})
    assert response.status_code == 403 and backend.policy_writes == 0 and backend.watched == []


@pytest.mark.parametrize(
    ("change", "headers"),
    [
        ({}, {"origin": "https://evil.example"}),
        ({}, {"origin": ORIGIN, "sec-fetch-site": "cross-site"}),
        ({}, {"origin": ""}),
        ({"csrf_token": "guessed"}, {"origin": ORIGIN}),
        ({"csrf_token": ""}, {"origin": ORIGIN}),
    ],
    ids=["other-origin", "cross-site", "no-origin", "wrong-token", "no-token"],
)
def test_policy_form_needs_same_origin_and_its_csrf_token(
    signed_in: Harness, change: dict[str, str], headers: dict[str, str]
) -> None:
    """A policy post from another origin, or without the session's CSRF token, is refused unwritten."""
    client, backend, _ = signed_in
    form = {**policies_form(client, {"approved_models": "claude-x"}), **change}
    assert client.post("/policies", data=form, headers=headers).status_code == 403
    assert backend.policy_writes == 0


# --- Policies


def test_policies_page_shows_every_policy_with_room_for_more(signed_in: Harness) -> None:
    """Stored policies fill the form, a row per pattern and key and two blank rows, each marked on or off."""
    client, backend, _ = signed_in
    backend.write_policies(
        {
            "approved_models": ["claude-sonnet-4-5", "claude-haiku-4-5*"],
            "banned_patterns": [{"id": "openai-key", "pattern": "sk-[A-Za-z0-9]{20,}"}],
            "key_environment_check": [{"key_fingerprint": "a" * 32, "environments": ["prod", "staging"]}],
            "journal_prompts": True,
        }
    )
    html = client.get("/policies").text
    assert ">claude-sonnet-4-5\nclaude-haiku-4-5*</textarea>" in html
    assert (
        'name="banned_patterns[0].pattern" type="text" inputmode="text" value="sk-[A-Za-z0-9]{20,}"' in html
    )
    assert 'id="f-banned_patterns-2-id"' in html and 'id="f-banned_patterns-3-id"' not in html
    assert re.search(r'name="key_environment_check\[0\]\.kind">.*?value="fingerprint" selected', html, re.S)
    assert 'value="prod, staging"' in html and re.search(r'id="f-journal_prompts"[^>]*checked', html)
    badges = dict(re.findall(r'id="policy-(\w+)">\s*<legend>.*?badge-(\w+)', html, re.S))
    assert badges == {
        "approved_models": "enforced",
        "banned_patterns": "enforced",
        "key_environment_check": "enforced",
        "approval_required_threshold_cents": "off",
    }


def test_policies_save_skips_blank_rows_and_keeps_the_rest(signed_in: Harness) -> None:
    """A valid form is written compare-and-set: blank rows dropped, each policy as typed, version shown."""
    client, backend, _ = signed_in
    typed = {
        "approved_models": "claude-sonnet-4-5\n\n claude-haiku-4-5* ,gpt-5",
        "banned_patterns[1].id": "live-key",
        "banned_patterns[1].pattern": "sk-live-",
        "key_environment_check[0].kind": "label",
        "key_environment_check[0].key": "ci-key",
        "key_environment_check[0].environments": "staging, dev",
        "approval_required_threshold_cents": "500",
        "journal_prompts": "on",
    }
    response = post_policies(client, policies_form(client, typed))
    assert response.status_code == 303 and response.headers["location"] == "/policies?saved=1"
    assert backend.policies.policies == {
        "approved_models": ["claude-sonnet-4-5", "claude-haiku-4-5*", "gpt-5"],
        "banned_patterns": [{"id": "live-key", "pattern": "sk-live-"}],
        "key_environment_check": [{"key_label": "ci-key", "environments": ["staging", "dev"]}],
        "approval_required_threshold_cents": 500,
        "journal_prompts": True,
    }
    page = client.get("/policies?saved=1").text
    assert "Saved as version 1" in page and "+ banned_patterns[live-key]: &#34;sk-live-&#34;" in page
    cleared = policies_form(client, {"banned_patterns[0].id": "", "banned_patterns[0].pattern": ""})
    assert post_policies(client, cleared).status_code == 303
    assert "banned_patterns" not in backend.policies.policies, "clearing a row removes its pattern"


def test_service_field_violations_land_beside_the_row_they_name(signed_in: Harness) -> None:
    """A BadRequest about the service's k-th pattern, key or model is shown beside the row it came from."""
    client, backend, _ = signed_in
    backend.reject = [
        FieldViolation("policies.banned_patterns[1].pattern", "RE2 refuses '(a': missing ): (a"),
        FieldViolation("policies.approved_models[1]", "must be 1-128 characters"),
        FieldViolation("policies.key_environment_check[0].environments[1]", "must be 1-32 characters"),
        FieldViolation(
            "policies.key_environment_check[0]", "set exactly one of key_fingerprint and key_label"
        ),
        FieldViolation("something_else", "the service says no"),
    ]
    typed = {
        "approved_models": "good\nbad model",
        # Row 1 is left blank: the service's pattern 1 is the form's row 2.
        "banned_patterns[0].id": "ok",
        "banned_patterns[0].pattern": "fine",
        "banned_patterns[2].id": "broken",
        "banned_patterns[2].pattern": "(a",
        "key_environment_check[0].key": "ci",
        "key_environment_check[0].environments": "prod, dev!",
    }
    response = post_policies(client, policies_form(client, typed))
    assert response.status_code == 422 and backend.policy_writes == 0
    html = response.text
    row = field_block(html, "f-banned_patterns-2-pattern")
    assert "RE2 refuses &#39;(a&#39;: missing ): (a" in row and 'aria-invalid="true"' in row
    assert "autofocus" in field_block(html, "f-approved_models"), "the first bad field has focus"
    assert "aria-invalid" not in field_block(html, "f-banned_patterns-0-pattern")
    assert "&#39;bad model&#39; must be 1-128 characters" in field_block(html, "f-approved_models")
    assert "&#39;dev!&#39; must be 1-32" in field_block(html, "f-key_environment_check-0-environments")
    assert "set exactly one" in field_block(html, "f-key_environment_check-0-key")
    summary = html.split('class="error-summary"')[1].split("</section>")[0]
    assert 'href="#f-banned_patterns-2-pattern">Banned pattern 3, pattern: RE2 refuses' in summary
    assert "the service says no" in summary
    assert 'value="(a"' in html and 'name="etag" value=""' in html, "typed values and the loaded etag kept"


def test_local_errors_never_reach_the_service(signed_in: Harness) -> None:
    """A non-integer threshold or a provider key typed as a label is refused here, the key not echoed."""
    client, backend, _ = signed_in
    typed = {
        "approval_required_threshold_cents": "5 dollars",
        "key_environment_check[0].kind": "label",
        "key_environment_check[0].key": SECRET,
        "key_environment_check[0].environments": "prod",
    }
    response = post_policies(client, policies_form(client, typed))
    assert response.status_code == 422 and backend.policy_writes == 0
    assert "whole number of US cents" in field_block(response.text, "f-approval_required_threshold_cents")
    assert "looks like a provider API key" in field_block(response.text, "f-key_environment_check-0-key")
    assert SECRET not in response.text


def test_stale_policy_edit_is_a_conflict_with_diffs_and_overwrites_nothing(signed_in: Harness) -> None:
    """When someone saved first nothing is written; both diffs show, the edit stays, a 2nd save replaces."""
    client, backend, _ = signed_in
    backend.write_policies({"approved_models": ["a"]})
    form = policies_form(client, {"approved_models": "a\nb"})
    backend.write_policies(
        {"approved_models": ["a"], "approval_required_threshold_cents": 100}, by="alice (9)"
    )
    response = post_policies(client, form)
    assert response.status_code == 409 and backend.policy_writes == 0
    assert backend.policies.policies == {"approved_models": ["a"], "approval_required_threshold_cents": 100}
    theirs, mine = response.text.split("What they changed")[1].split("Your edit compared")
    assert "+ approval_required_threshold_cents: 100" in theirs
    mine = mine.split("</section>")[0]
    assert "- approval_required_threshold_cents: 100" in mine and "+ approved_models[&#34;b&#34;]" in mine
    assert "alice (9) saved version 2" in response.text and ">a\nb</textarea>" in response.text
    again = post_policies(client, {**form, **hidden_fields(response.text, "policies")})
    assert again.status_code == 303 and backend.policies.policies == {"approved_models": ["a", "b"]}


def test_policy_history_diffs_item_by_item_and_pages(signed_in: Harness) -> None:
    """History diffs each revision by model, pattern and key, 20 to a page; a bad page token is a 404."""
    client, backend, _ = signed_in
    for i in range(22):
        backend.write_policies(
            {"banned_patterns": [{"id": f"p{j}", "pattern": f"x{j}"} for j in range(i + 1)]}
        )
    first = client.get("/policies/history").text
    assert first.count('class="revision-title"') == 20
    assert "+ banned_patterns[p21]: &#34;x21&#34;" in first and "banned_patterns[p0]" not in first
    older = re.search(r'href="(/policies/history\?page_token=20)"', first)
    assert older, "an Older changes link"
    second = client.get(older.group(1)).text
    assert second.count('class="revision-title"') == 2 and "+ banned_patterns[p0]: &#34;x0&#34;" in second
    assert client.get("/policies/history?page_token=nonsense").status_code == 404


def test_policies_form_round_trips() -> None:
    """Policies shown in the form and submitted unchanged parse back to the same policies."""
    policies = policies_from_dict(
        {
            "approved_models": ["claude-sonnet-4-5", "claude-haiku-4-5*"],
            "banned_patterns": [{"id": "a", "pattern": "sk-[a-z]+"}, {"id": "b", "pattern": "x, y"}],
            "key_environment_check": [
                {"key_label": "ci", "environments": ["dev"]},
                {"key_fingerprint": "f" * 32, "environments": ["prod", "staging"]},
            ],
            "approval_required_threshold_cents": 0,
            "journal_prompts": True,
        }
    )
    values = form_values(policies_to_dict(policies))
    form: dict[str, list[str]] = {
        "approved_models": [values.approved_models],
        "approval_required_threshold_cents": [values.threshold_cents],
        "journal_prompts": ["on"],
    }
    for i, row in enumerate(values.patterns):
        form |= {f"banned_patterns[{i}].id": [row.id], f"banned_patterns[{i}].pattern": [row.pattern]}
    for i, key in enumerate(values.keys):
        form |= {
            f"key_environment_check[{i}].kind": [key.kind],
            f"key_environment_check[{i}].key": [key.key],
            f"key_environment_check[{i}].environments": [key.environments],
        }
    parsed = parse_policies_form(form)
    assert parsed.errors == {} and parsed.policies == policies
    assert errors_from([FieldViolation("policies.banned_patterns[7].pattern", "x")], parsed) == {
        "banned_patterns": ["x"]
    }, "an index the form never sent still lands on its policy"
    assert Policies() == parse_policies_form({}).policies


# --- Violations


def test_feed_lists_newest_first_and_goes_live_from_the_newest(signed_in: Harness) -> None:
    """The page lists the newest violations first and its live stream starts right after the newest shown."""
    client, backend, _ = signed_in
    backend.feed = [violation(i) for i in range(3)]
    html = client.get("/violations").text
    ids = re.findall(r'class="violation" id="v-(\w+)"', html)
    assert ids == [f"{i:032x}" for i in (2, 1, 0)]
    stream = re.search(r'data-stream="([^"]+)"', html)
    assert stream and stream.group(1) == f"/violations/stream?cursor={BASE_MS + 2000}-0"
    assert '<script src="/static/violations.js" defer></script>' in html
    assert "Older violations" not in html


def test_an_empty_feed_goes_live_from_the_newest_of_any_kind(signed_in: Harness) -> None:
    """Matching nothing, the stream starts after the newest violation of any kind, or the start."""
    client, backend, _ = signed_in
    html = client.get("/violations?type=banned_patterns").text
    assert "No violations match these filters yet." in html
    assert 'data-stream="/violations/stream?type=banned_patterns&amp;cursor=0"' in html
    backend.feed = [violation(1)]
    html = client.get("/violations?type=banned_patterns").text
    assert f"cursor={BASE_MS + 1000}-0" in html


def test_filters_reach_the_service_the_stream_and_every_link(signed_in: Harness) -> None:
    """Type, project and session filters reach ListViolations, the stream's URL and the older-page link."""
    client, backend, _ = signed_in
    backend.feed = [
        violation(i, PolicyType.APPROVED_MODELS if i % 2 else PolicyType.APPROVAL_REQUIRED_THRESHOLD)
        for i in range(60)
    ] + [violation(60, session="s2"), violation(61, project="batch")]
    html = client.get(
        "/violations", params={"type": "approved_models", "project": "web", "session": "s1"}
    ).text
    where = ViolationFilter(PolicyType.APPROVED_MODELS, "s1", "web")
    assert backend.listed[0] == (where, violations_page.PAGE_SIZE, "")
    assert backend.listed[1:] == [(where, violations_page.READ_PAGE_SIZE, "")], "the summary, same filters"
    assert len(re.findall(r'class="violation"', html)) == 25
    assert (
        'data-stream="/violations/stream?type=approved_models&amp;project=web&amp;session=s1&amp;cursor='
        in html
    )
    older = re.search(
        r'href="(/violations\?type=approved_models&amp;project=web&amp;session=s1&amp;page_token=[^"]+)"',
        html,
    )
    assert older, "the older page keeps the filters"
    second = client.get(older.group(1).replace("&amp;", "&")).text
    assert len(re.findall(r'class="violation"', second)) == 5 and "data-stream" not in second
    assert 'href="/violations?type=approved_models&amp;project=web&amp;session=s1">Newest</a>' in second
    assert re.search(r'id="filter-type".*?value="approved_models" selected', html, re.S)


def test_bad_filters_are_shown_beside_their_fields(signed_in: Harness) -> None:
    """A filter the service could never match is refused beside its field, and nothing is listed."""
    client, backend, _ = signed_in
    response = client.get("/violations", params={"type": "nope", "project": "no/slash", "session": "a b"})
    assert response.status_code == 400 and backend.listed == []
    for html_id, message in (
        ("filter-type", "&#39;nope&#39; is not a policy type"),
        ("filter-project", "1-64 characters"),
        ("filter-session", "1-128 characters"),
    ):
        assert message in field_block(response.text, html_id)
    assert client.get("/violations?page_token=garbage").status_code == 404


def test_a_banned_pattern_shows_only_pattern_offset_and_redacted_excerpt(signed_in: Harness) -> None:
    """A pattern hit is described from its pattern, offset and redacted excerpt, never from free text."""
    client, backend, _ = signed_in
    hit = PatternHit("live-key", "sk-live-", 27, "…my key is [REDACTED] why does it fail?")
    backend.feed = [
        violation(1, PolicyType.BANNED_PATTERNS, message=f"prompt held {SECRET}", pattern=hit),
        violation(2, PolicyType.BANNED_PATTERNS, pattern=PatternHit("p2", "x", 3, matched_on_client=True)),
    ]
    html = client.get("/violations").text
    assert SECRET not in html and "prompt held" not in html
    assert "banned pattern <code>live-key</code> at offset 27" in html
    assert "<code>sk-live-</code>" in html and "my key is [REDACTED] why does it fail?" in html
    assert "matched on the client" in html and "the prompt never left the client" in html


def test_stream_relays_violations_as_events_whose_ids_are_cursors(signed_in: Harness) -> None:
    """The stream sends each matching violation (the list's markup) with its cursor as the event id."""
    client, backend, _ = signed_in
    backend.feed = [violation(1), violation(2, session="other"), violation(3)]
    with client.stream("GET", "/violations/stream?session=s1&cursor=0") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        got = events(response.iter_lines(), 2)
    assert [e["id"] for e in got] == [f"{BASE_MS + 1000}-0", f"{BASE_MS + 3000}-0"]
    assert all(e["event"] == "violation" for e in got)
    assert got[0]["data"].startswith(
        f'<li class="violation" id="v-{1:032x}" data-group="approved_models:m1">'
    )
    assert backend.watched == [(ViolationFilter(None, "s1", ""), "0")]


def test_stream_resumes_after_the_browsers_last_event_id(signed_in: Harness) -> None:
    """A reconnect's Last-Event-ID overrides the page's cursor: the watch resumes right after it."""
    client, backend, _ = signed_in
    backend.feed = [violation(i) for i in range(1, 5)]
    headers = {"last-event-id": f"{BASE_MS + 2000}-0"}
    with client.stream("GET", "/violations/stream?cursor=0", headers=headers) as response:
        got = events(response.iter_lines(), 2)
    assert [e["id"] for e in got] == [f"{BASE_MS + 3000}-0", f"{BASE_MS + 4000}-0"]
    assert backend.watched[-1][1] == f"{BASE_MS + 2000}-0"
    bad = client.get("/violations/stream", headers={"last-event-id": "'; drop"})
    assert bad.status_code == 400


def test_stream_ends_for_good_when_the_key_is_refused(signed_in: Harness) -> None:
    """A key the service stops accepting ends the stream with an 'ended' event, and the session with it."""
    client, backend, _ = signed_in
    backend.feed = [violation(1)]
    backend.watch_error = NotAuthorized("revoked")
    with client.stream("GET", "/violations/stream?cursor=0") as response:
        got = events(response.iter_lines(), 2)
    assert [e["event"] for e in got] == ["violation", "ended"] and "no longer accepts" in got[1]["data"]
    assert client.get("/violations").status_code == 303


def test_stream_ends_when_the_session_does_and_never_extends_it(
    signed_in: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Watching is not activity: an open stream keeps no session alive and stops once it has ended."""
    client, backend, clock = signed_in
    monkeypatch.setattr(violations_page, "HEARTBEAT_SECONDS", 0.01)
    backend.watch_hold = asyncio.Event()  # the watch stays open, sending nothing
    with client.stream("GET", "/violations/stream") as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith(":")) == ": keep-alive"
        clock.advance(601_000)  # idle for longer than the limit while the stream is open
        got = events(lines, 1)
    assert got[0]["event"] == "ended" and "session ended" in got[0]["data"]
    assert client.get("/violations").status_code == 303


def test_stream_ends_on_refusal_and_closes_quietly_when_the_service_goes_away(signed_in: Harness) -> None:
    """A refused watch ends the feed with its reason; an unavailable service just ends the response."""
    client, backend, _ = signed_in
    backend.feed = [violation(1)]
    backend.watch_error = BackendError("INTERNAL: boom")
    with client.stream("GET", "/violations/stream?cursor=0") as response:
        got = events(response.iter_lines(), 2)
    assert got[1]["event"] == "ended" and "boom" in got[1]["data"]
    backend.watch_error = BackendUnavailable("down")
    with client.stream("GET", "/violations/stream?cursor=0") as response:
        body = response.read().decode()
    assert "event: violation" in body and "event: ended" not in body
    backend.watch_error = RuntimeError("a bug")  # not a BackendError: a bug in the relay itself
    with client.stream("GET", "/violations/stream?cursor=0") as response:
        body = response.read().decode()
    assert "event: ended\ndata: spendgate refused the live feed: the console failed to relay" in body


# --- Sessions


def summary(session_id: str, spend: int, budget: int | None, **fields: Any) -> SessionSummary:
    values: dict[str, Any] = {
        "session_id": session_id,
        "project": "web",
        "spend_nano_usd": spend,
        "budget_nano_usd": budget,
        "decisions": 7,
        "blocked": {},
        "last_seen_ms": BASE_MS + 10 * MINUTE_MS,
        **fields,
    }
    return SessionSummary(**values)


def test_sessions_show_budget_blocks_and_a_chart_with_words(signed_in: Harness) -> None:
    """Each session shows budget as a meter and in words, blocks by rule, and an SVG chart with its words."""
    client, backend, _ = signed_in
    backend.sessions = [
        summary(
            "agent-7",
            4_500_000_000,
            5_000_000_000,
            blocked={Rule.SESSION_BUDGET: 2, Rule.DUPLICATE_REQUEST: 5},
        ),
        summary("batch-1", 120_000_000, None, project="batch"),
    ]
    backend.spend["agent-7"] = [
        SpendPoint(BASE_MS + 2 * MINUTE_MS, 1_000_000_000),
        SpendPoint(BASE_MS + 9 * MINUTE_MS, 3_500_000_000),
    ]
    html = client.get("/sessions").text
    first, second = html.split('class="session-card"')[1:3]
    assert re.search(
        r'<meter id="s-0-budget" min="0" max="100" low="80" high="99" optimum="0"\s+value="90"', first
    )
    assert "$4.5 of $5 (90%)" in first and 'aria-describedby="s-0-budget-text"' in first
    assert "7:" in first and "Duplicate requests (<code>dedup_ttl_seconds</code>): 5" in first
    assert first.index("Duplicate requests") < first.index("Session budget"), "most blocks first"
    assert first.count("<rect") == 2 and 'role="img" aria-labelledby="s-0-chart-text"' in first
    assert "$4.5 in all, at most $3.5" in first and first.count("<tr><td>") == 2
    assert 'href="/violations?session=agent-7"' in first
    assert "<meter" not in second and "$0.12 spent, no session budget" in second
    assert re.search(r"<dt>Blocked</dt><dd>\s*none\s*</dd>", second)
    assert "No settled spend to chart yet." in second


def test_sessions_filter_by_project(signed_in: Harness) -> None:
    """The project filter reaches ListSessions; a name the service could never accept is refused beside it."""
    client, backend, _ = signed_in
    backend.sessions = [summary("a", 10, None), summary("b", 5, None, project="batch")]
    html = client.get("/sessions?project=batch").text
    assert backend.sessions_asked == ["batch"] and "<code>b</code>" in html and "<code>a</code>" not in html
    response = client.get("/sessions?project=no/slash")
    assert response.status_code == 400 and "1-64 characters" in field_block(response.text, "filter-project")
    assert backend.sessions_asked == ["batch"]


def test_budget_words_say_over_and_zero() -> None:
    """Spend past the budget (crossing mode) and a zero budget are said in words, not only drawn."""
    over = session_card(summary("x", 6_000_000_000, 5_000_000_000), None)
    assert (over.budget_percent, over.budget_text) == (120, "$6 of $5 (120%), over by $1")
    assert "every call is blocked" in session_card(summary("y", 0, 0), None).budget_text


def test_spend_chart_spans_ten_minutes_at_least_and_buckets_a_long_day() -> None:
    """A new session's chart spans 10 minutes; a day is summed into at most 60 bars; no spend, no chart."""
    assert spend_chart([], BASE_MS) is None
    short = spend_chart([SpendPoint(BASE_MS, 5)], BASE_MS)
    assert short is not None and short.bucket_minutes == 1
    assert (short.end_ms - short.start_ms) // MINUTE_MS == MIN_SPAN_MINUTES
    assert [(b.x, b.y, b.width, b.height) for b in short.bars] == [(270.0, 16.0, 29.0, 48.0)], (
        "the last of 10 slots, a block a tenth of the chart wide, with room above for its value"
    )
    assert (short.bars[0].label, short.bars[0].label_anchor, short.bars[0].label_x) == ("$0", "end", 299.0)
    day = [SpendPoint(BASE_MS + m * MINUTE_MS, 1 + m) for m in range(1440)]
    long = spend_chart(day, BASE_MS + 1439 * MINUTE_MS)
    assert long is not None and long.bucket_minutes == 24 and len(long.bars) == MAX_BARS
    assert long.total_nano_usd == sum(p.cost_nano_usd for p in day) and long.peak is long.bars[-1]
    assert long.end_ms == BASE_MS + 1440 * MINUTE_MS, "the last bucket ends with the last minute"
    assert [b.label for b in long.bars if b.label] == [format_usd(long.peak.cost_nano_usd)], "only the peak"
    tiny = spend_chart([SpendPoint(BASE_MS, 1), SpendPoint(BASE_MS + MINUTE_MS, 10**9)], BASE_MS)
    assert tiny is not None and min(b.height for b in tiny.bars) == 1.0, "a small spend stays visible"


def test_a_handful_of_points_are_blocks_in_time_order() -> None:
    """Five minutes of spend within half an hour: five separate bars, each at least 8 units wide, in order."""
    minutes = (0, 3, 4, 17, 29)
    points = [SpendPoint(BASE_MS + m * MINUTE_MS, 1_000_000 * (i + 1)) for i, m in enumerate(minutes)]
    chart = spend_chart(points, BASE_MS + 29 * MINUTE_MS)
    assert chart is not None and chart.bucket_minutes == 1 and len(chart.bars) == 5
    assert all(b.width >= 8 for b in chart.bars)
    assert [b.start_ms for b in chart.bars] == [p.minute_start_ms for p in points]
    xs = [b.x for b in chart.bars]
    assert xs == sorted(xs) and all(b.x + b.width < nxt for b, nxt in zip(chart.bars, xs[1:], strict=False))
    # 0 and 17 and 29 stand apart, 3 and 4 touch: too close for every value, so only the peak's.
    assert [b.label for b in chart.bars] == ["", "", "", "", "$0.005"]
    apart = spend_chart([SpendPoint(BASE_MS + m * MINUTE_MS, 2_500_000) for m in (0, 10, 20)], BASE_MS)
    assert apart is not None and [b.label for b in apart.bars] == ["$0.0025"] * 3


def test_violations_group_by_policy_and_what_broke_it() -> None:
    """One row per policy and pattern, model, key or threshold: counts, sessions, the last time, a trend."""
    hit = PatternHit("live-key", "sk-live-", 3, "…")
    feed = [
        *(violation(i, PolicyType.BANNED_PATTERNS, session=f"s{i % 3}", pattern=hit) for i in range(12)),
        *(violation(20 + i, effective_model="m-cheap", session="s9") for i in range(4)),
        violation(30, PolicyType.KEY_ENVIRONMENT_CHECK, key_label="ci-key", environment="prod"),
        violation(31, PolicyType.KEY_ENVIRONMENT_CHECK, key_label="ci-key", environment="dev"),
        violation(32, PolicyType.APPROVAL_REQUIRED_THRESHOLD, threshold_cents=500),
    ]
    now = BASE_MS + 3600 * 1000
    summary = summarize(feed, now - 24 * 3600 * 1000, now, complete=True)
    rows = [(g.group.key, g.group.what, g.count, g.sessions) for g in summary.groups]
    assert rows == [
        ("banned_patterns:live-key", "live-key", 12, 3),
        ("approved_models:m-cheap", "m-cheap", 4, 1),
        ("approval_required_threshold_cents:500", "over 500 cents", 1, 1),
        ("key_environment_check:ci-key:dev", "ci-key", 1, 1),
        ("key_environment_check:ci-key:prod", "ci-key", 1, 1),
    ]
    assert (summary.total, summary.sessions) == (len(feed), 4), "s0-s2, s9, and s1 again"
    assert summary.groups[0].last_ms == BASE_MS + 11_000 and summary.groups[0].group.detail == "sk-live-"
    assert summary.chart is not None and summary.chart.total == len(feed)
    trend = summary.groups[0].trend
    assert trend is not None and trend.total == 12 and trend.bucket_minutes == summary.chart.bucket_minutes


def test_violations_page_shows_the_groups_then_compact_rows(signed_in: Harness) -> None:
    """Thirty alike violations are one row of the summary (with its chart) above the paged list."""
    client, backend, clock = signed_in
    clock.advance(60_000)
    backend.feed = [violation(i, effective_model="m-cheap", session=f"s{i % 4}") for i in range(30)]
    html = client.get("/violations").text
    assert html.count("<tr data-group=") == 1
    row = html.split('<tr data-group="approved_models:m-cheap">')[1].split("</tr>")[0]
    assert '<td class="num group-count" data-label="violations">30</td>' in row
    assert '<td class="num" data-label="sessions">4</td>' in row
    text = " ".join(html.split())
    assert "30 violations of 1 kind in 4 sessions." in text
    assert re.search(r'aria-labelledby="summary-chart-text".*?Violations per minute, .*?30 in all', text)
    assert len(re.findall(r'class="violation" id="v-', html)) == violations_page.PAGE_SIZE
    assert len(re.findall(r'<li class="violation" [^>]*data-group="approved_models:m-cheap"', html)) == 25
    older = client.get(re.findall(r'href="(/violations\?page_token=[^"]+)"', html)[0]).text
    assert "<tr data-group=" not in older and "Older violations" in older


def test_the_summary_says_when_the_window_held_more(
    signed_in: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past WINDOW_LIMIT violations the summary counts the newest and says there were more."""
    client, backend, clock = signed_in
    clock.advance(60_000)
    monkeypatch.setattr(violations_page, "WINDOW_LIMIT", 10)
    monkeypatch.setattr(violations_page, "READ_PAGE_SIZE", 4)
    backend.feed = [violation(i) for i in range(30)]
    html = client.get("/violations").text
    assert "10 violations of 10 kinds in 1 session: the newest 10, there were more." in " ".join(html.split())
    assert [size for _, size, _ in backend.listed[1:]] == [4, 4, 4]


# --- the gRPC backend and the live feed against a real server


@pytest.fixture
def server(spendgate: Callable[..., SpendgateServer], tmp_path: Path) -> SpendgateServer:
    """A memory-store server (its evaluator embedded and quick) with round prices."""
    config = tmp_path / "prices.yaml"
    config.write_text(PRICES_YAML)
    return spendgate("--config", str(config), "--evaluator-poll-millis", "20")


def settle_call(target: str, session: str, model: str, fingerprint: bytes, **config: Any) -> bool:
    """Decide one call and settle it when allowed; True when it was allowed."""
    with DecisionClient(target, timeout=5, fail_mode="closed") as client:
        decision = client.decide(session, model, 100, 100, fingerprint, enforcement_config=config or None)
        if decision.allowed:
            client.settle(session, decision.reservation_id, model, input_tokens=100, output_tokens=10)
        return decision.allowed


async def test_backend_policies_feed_and_sessions_against_a_real_server(server: SpendgateServer) -> None:
    """RE2 refusals name the pattern, stale etags conflict, the feed and sessions arrive as domain types."""
    backend = GrpcBackend(server.target)
    try:
        bad = Policies(banned_patterns=(BannedPattern("p", "(?<=look)behind"),))
        with pytest.raises(InvalidInput) as refused:
            await backend.update_policies("", bad, "")
        [problem] = refused.value.violations
        assert problem.field == "policies.banned_patterns[0].pattern" and "RE2 refuses" in problem.description
        first = await backend.update_policies("", Policies(approved_models=("claude-test-big",)), "")
        with pytest.raises(EditConflict):
            # Well formed but not the current etag (a malformed one is INVALID_ARGUMENT instead).
            await backend.update_policies("", Policies(), str(first.version + 1))
        assert (await backend.get_policies("")).policies == {"approved_models": ["claude-test-big"]}
        history = await backend.list_policy_revisions("", 5, "")
        assert [r.version for r in history.revisions] == [first.version] and history.older is None

        session = new_session()
        for i in range(3):
            settle_call(server.target, session, "claude-test-small", bytes([i]) * 32)
        settle_call(server.target, new_session(), "claude-test-small", b"z" * 32)
        where = ViolationFilter(PolicyType.APPROVED_MODELS, session, "")
        deadline = time.monotonic() + DEADLINE_SECONDS
        # Wait for all three: with only two evaluated yet, a page of two would rightly be the last.
        while len((await backend.list_violations("", where, 3, "")).violations) < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        page = await backend.list_violations("", where, 2, "")
        assert page.next_page_token and all(v.session_id == session for v in page.violations)
        watch = backend.watch_violations("", where, "0")
        streamed = [await anext(watch) for _ in range(3)]
        await watch.aclose()
        assert [v.cursor for v in streamed] == sorted(v.cursor for v in streamed)
        assert {v.violation_id for v in streamed} >= {v.violation_id for v in page.violations}

        deadline = time.monotonic() + DEADLINE_SECONDS
        while not (sessions := await backend.list_sessions("", "", 10)) or sessions[0].decisions < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        top = next(s for s in sessions if s.session_id == session)
        spend = await backend.get_session_spend("", session)
        assert sum(p.cost_nano_usd for p in spend) == top.spend_nano_usd > 0
    finally:
        await backend.close()


def test_live_feed_resumes_over_a_real_watch_with_nothing_missed_or_repeated(server: SpendgateServer) -> None:
    """Through the console's stream, a reconnect with Last-Event-ID gets each later violation once."""
    app = create_app(
        backend_factory=lambda: GrpcBackend(server.target),
        origins=frozenset({ORIGIN}),
        secure_cookies=False,
        target=server.target,
    )
    with TestClient(app, base_url=ORIGIN, follow_redirects=False) as client:
        token = token_of(client.get("/signin").text)
        client.post("/signin", data={"csrf_token": token, "api_key": "dev"}, headers={"origin": ORIGIN})
        form = {
            **hidden_fields(client.get("/policies").text, "policies"),
            "approved_models": "claude-test-big",
        }
        assert post_policies(client, form).status_code == 303
        session = new_session()
        html = client.get("/violations", params={"session": session}).text
        url = re.search(r'data-stream="([^"]+)"', html)
        assert url, "the first page goes live"

        def cause(count: int) -> None:
            for _ in range(count):
                digest = hashlib.sha256(new_session().encode()).digest()
                assert settle_call(server.target, session, "claude-test-small", digest)
            # Another session's violation in between: the filtered stream must skip it.
            settle_call(server.target, new_session(), "claude-test-small", b"o" * 32)

        cause(3)
        with client.stream("GET", url.group(1).replace("&amp;", "&")) as response:
            first = events(response.iter_lines(), 2)
        cause(2)
        headers = {"last-event-id": first[-1]["id"]}
        with client.stream("GET", url.group(1).replace("&amp;", "&"), headers=headers) as response:
            rest = events(response.iter_lines(), 3)
    ids = [re.search(r'id="v-(\w+)"', e["data"]).group(1) for e in first + rest]  # type: ignore[union-attr]
    assert len(ids) == len(set(ids)) == 5
    assert all(f"<code>{session}</code>" in e["data"] for e in first + rest)
    cursors = [e["id"] for e in first + rest]
    assert cursors == sorted(cursors, key=lambda c: tuple(int(p) for p in c.split("-")))
