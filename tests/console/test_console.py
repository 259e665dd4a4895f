"""Web console handlers: sign-in, sessions, CSRF and origin checks, the Rules page; the gRPC backend.

Handlers run in process (Starlette's TestClient) against an in-memory fake of the
backend; the backend itself is tested against a real ``spendgate serve``. The
Policies, Violations and Sessions pages are tested in test_console_pages.py with the
same fake.
"""

from __future__ import annotations

import argparse
import asyncio
import re
from collections.abc import AsyncGenerator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from spendgate.v1 import config_pb2 as cpb
from spendgate_server.console.app import allowed_origins, create_app
from spendgate_server.console.backend import (
    OPEN_MODE_TTL_SECONDS,
    BackendUnavailable,
    ConfigView,
    EditConflict,
    GrpcBackend,
    InvalidInput,
    NotAuthorized,
    PolicyRevisionPage,
    PolicyView,
    RevisionPage,
    ViolationPage,
)
from spendgate_server.console.rules_form import (
    RULE_KEYS,
    field_for_violation,
    form_values,
    parse_rules_form,
    rule_status,
)
from spendgate_server.console.settings import (
    ConsoleSettings,
    add_console_arguments,
    console_settings_from_args,
)
from spendgate_server.engine.config import EnforcementConfig, ModelDowngrade, Rule, config_to_dict
from spendgate_server.errors import ConfigError, FieldViolation, InvalidArgument
from spendgate_server.policy.policies import Policies, policies_to_dict
from spendgate_server.policy.violations import Violation, ViolationFilter
from spendgate_server.rpc.status import abort, rpc_status
from spendgate_server.store.insights import SessionSummary, SpendPoint
from spendgate_server.store.keys import parse_key
from starlette.testclient import TestClient

from tests.conftest import FakeClock
from tests.integration.test_security import create_key
from tests.processes import SpendgateServer, free_port

ORIGIN = "http://127.0.0.1:8080"
ALL_INTERFACES = "0.0.0.0"  # noqa: S104  # only parsed: the tests check the console refuses it unguarded
ADMIN_KEY = "sgk_0a1b2c3d_" + "A" * 43
CLIENT_KEY = "sgk_0f0f0f0f_" + "B" * 43
_TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


class FakeBackend:
    """The Backend protocol in memory: compare-and-set on etags, history, and switchable failures."""

    def __init__(self) -> None:
        self.configs: dict[str, ConfigView] = {}
        self.history: dict[str, list[ConfigView]] = {}
        self.version = 0
        self.writes = 0
        self.accepted = {ADMIN_KEY}
        # A service without keys (open development mode) takes every call, with any key or none.
        self.open = False
        self.unavailable = False
        self.reject: list[FieldViolation] = []
        self.closed = False
        self.policies = PolicyView({})
        self.policy_history: list[PolicyView] = []
        self.policy_writes = 0
        # The feed, oldest first (cursors increase), and what watchers asked for.
        self.feed: list[Violation] = []
        self.listed: list[tuple[ViolationFilter, int, str]] = []
        self.watched: list[tuple[ViolationFilter, str]] = []
        # Raised by a watch after it has sent what it had (None: it just ends).
        self.watch_error: Exception | None = None
        # A watch waits here after sending what it had, until set (None: it ends at once).
        self.watch_hold: asyncio.Event | None = None
        self.sessions: list[SessionSummary] = []
        self.spend: dict[str, list[SpendPoint]] = {}
        self.sessions_asked: list[str] = []

    def _check(self, api_key: str) -> None:
        if self.unavailable:
            raise BackendUnavailable("connection refused")
        if api_key not in self.accepted and not self.open:
            parsed = parse_key(api_key)
            raise NotAuthorized(f"API key {parsed[0] if parsed else '?'} is not valid")

    async def verify_admin(self, api_key: str) -> None:
        if api_key == CLIENT_KEY and not self.open:
            raise NotAuthorized(
                "API key 0f0f0f0f has the client scope; UpdateConfig needs an admin key", wrong_scope=True
            )
        self._check(api_key)

    async def open_mode(self) -> bool:
        self._check(ADMIN_KEY)
        return self.open

    async def get_config(self, api_key: str, project: str) -> ConfigView:
        self._check(api_key)
        return self.configs.get(project, ConfigView(project, {}))

    def write(self, project: str, rules: dict[str, Any], by: str = "ops (0a1b2c3d)") -> ConfigView:
        """Store a config as the service would (also how tests play 'someone else')."""
        self.version += 1
        view = ConfigView(
            project, rules, self.version, str(self.version), by, datetime(2026, 1, 2, tzinfo=UTC)
        )
        self.configs[project] = view
        self.history.setdefault(project, []).insert(0, view)
        return view

    async def update_config(
        self, api_key: str, project: str, config: EnforcementConfig, etag: str
    ) -> ConfigView:
        self._check(api_key)
        if self.reject:
            raise InvalidInput("refused", self.reject)
        if etag != self.configs.get(project, ConfigView(project, {})).etag:
            raise EditConflict("etag mismatch")
        self.writes += 1
        return self.write(project, config_to_dict(config))

    async def list_revisions(
        self, api_key: str, project: str, page_size: int, page_token: str
    ) -> RevisionPage:
        self._check(api_key)
        revisions = self.history.get(project, [])
        start = int(page_token or 0)
        end = start + page_size
        more = end < len(revisions)
        return RevisionPage(
            tuple(revisions[start:end]), str(end) if more else "", revisions[end] if more else None
        )

    def write_policies(self, policies: dict[str, Any], by: str = "ops (0a1b2c3d)") -> PolicyView:
        """Store policies as the service would (also how tests play 'someone else')."""
        self.version += 1
        view = PolicyView(policies, self.version, str(self.version), by, datetime(2026, 1, 2, tzinfo=UTC))
        self.policies = view
        self.policy_history.insert(0, view)
        return view

    async def get_policies(self, api_key: str) -> PolicyView:
        self._check(api_key)
        return self.policies

    async def update_policies(self, api_key: str, policies: Policies, etag: str) -> PolicyView:
        self._check(api_key)
        if self.reject:
            raise InvalidInput("refused", self.reject)
        if etag != self.policies.etag:
            raise EditConflict("etag mismatch")
        self.policy_writes += 1
        return self.write_policies(policies_to_dict(policies))

    async def list_policy_revisions(
        self, api_key: str, page_size: int, page_token: str
    ) -> PolicyRevisionPage:
        self._check(api_key)
        if page_token and not page_token.isdigit():
            raise InvalidInput("bad token", [FieldViolation("page_token", "not a token")])
        start, revisions = int(page_token or 0), self.policy_history
        end = start + page_size
        more = end < len(revisions)
        return PolicyRevisionPage(
            tuple(revisions[start:end]), str(end) if more else "", revisions[end] if more else None
        )

    async def list_violations(
        self, api_key: str, where: ViolationFilter, page_size: int, page_token: str, *, since_ms: int = 0
    ) -> ViolationPage:
        self._check(api_key)
        self.listed.append((where, page_size, page_token))
        if page_token and not re.fullmatch(r"\d+-\d+", page_token):
            raise InvalidInput("bad token", [FieldViolation("page_token", "not a token")])
        newest_first = [
            v
            for v in reversed(self.feed)
            if where.matches(v) and (not page_token or v.cursor < page_token) and v.create_time_ms >= since_ms
        ]
        page = newest_first[:page_size]
        more = len(newest_first) > page_size
        return ViolationPage(tuple(page), page[-1].cursor if more else "")

    async def watch_violations(
        self, api_key: str, where: ViolationFilter, cursor: str
    ) -> AsyncGenerator[Violation, None]:
        self._check(api_key)
        self.watched.append((where, cursor))
        for violation in list(self.feed):
            if (cursor == "0" or violation.cursor > cursor) and where.matches(violation):
                yield violation
        if self.watch_hold is not None:
            await self.watch_hold.wait()
        if self.watch_error is not None:
            raise self.watch_error

    async def list_sessions(self, api_key: str, project: str, page_size: int) -> tuple[SessionSummary, ...]:
        self._check(api_key)
        self.sessions_asked.append(project)
        return tuple(s for s in self.sessions if not project or s.project == project)[:page_size]

    async def get_session_spend(self, api_key: str, session_id: str) -> tuple[SpendPoint, ...]:
        self._check(api_key)
        return tuple(self.spend.get(session_id, ()))

    async def close(self) -> None:
        self.closed = True


Harness = tuple[TestClient, FakeBackend, FakeClock]


def make_client(
    backend: FakeBackend, clock: FakeClock | None = None, *, public_url: str = "", base_url: str = ORIGIN
) -> TestClient:
    settings = ConsoleSettings(port=8080, public_url=public_url)
    clock = clock or FakeClock()
    app = create_app(
        backend_factory=lambda: backend,
        origins=allowed_origins(settings, 8080),
        secure_cookies=settings.secure_cookies,
        target="127.0.0.1:50051",
        projects=("batch",),
        idle_seconds=600,
        max_age_seconds=3600,
        clock=lambda: clock.now_ms / 1000,
        wall_clock_ms=lambda: clock.now_ms,
    )
    return TestClient(app, base_url=base_url, follow_redirects=False)


@pytest.fixture
def harness() -> Iterator[Harness]:
    backend, clock = FakeBackend(), FakeClock()
    with make_client(backend, clock) as client:
        yield client, backend, clock
    assert backend.closed


def token_of(html: str) -> str:
    match = _TOKEN.search(html)
    assert match, "no csrf_token field in the page"
    return match.group(1)


def sign_in(client: TestClient, key: str = ADMIN_KEY) -> Any:
    """Post the sign-in form the way a browser on the console's own origin does."""
    token = token_of(client.get("/signin").text)
    return client.post("/signin", data={"csrf_token": token, "api_key": key}, headers={"origin": ORIGIN})


def rules_form(client: TestClient, typed: dict[str, str], project: str = "") -> dict[str, str]:
    """The Rules form as loaded (hidden fields included), with ``typed`` values over it."""
    html = client.get("/rules", params={"project": project} if project else {}).text
    hidden = dict(
        re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', html.split('class="rules"')[1])
    )
    return {**hidden, **typed}


def post_rules(client: TestClient, form: dict[str, str], **headers: str) -> Any:
    return client.post("/rules", data=form, headers={"origin": ORIGIN, **headers})


def field_block(html: str, html_id: str) -> str:
    """The .field element holding the input ``html_id`` (where its error must be)."""
    start = html.rindex('<div class="field', 0, html.index(f'id="{html_id}"'))
    return html[start : html.index("</div>", start)]


# --- sessions, sign-in and sign-out


def test_pages_refuse_requests_without_a_session(harness: Harness) -> None:
    """Without a valid session a page redirects to sign-in and a form post is refused, changing nothing."""
    client, backend, _ = harness
    for path in ("/rules", "/rules/history", "/policies", "/violations", "/sessions"):
        response = client.get(path)
        assert response.status_code == 303 and response.headers["location"] == f"/signin?next={path}"
    client.cookies.set("sg_session", "forged-session-id")
    assert client.get("/rules").status_code == 303
    response = client.post("/rules", data={"token_ceiling": "1"}, headers={"origin": ORIGIN})
    assert response.status_code == 403 and backend.writes == 0


def test_sign_in_sets_a_strict_httponly_session_cookie(harness: Harness) -> None:
    """An admin key starts a session: HttpOnly, SameSite=Strict cookie; the key never reaches the browser."""
    client, _, _ = harness
    response = sign_in(client)
    assert response.status_code == 303 and response.headers["location"] == "/rules"
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith("sg_session="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain HTTP on loopback: a Secure cookie would never come back
    page = client.get("/rules")
    assert page.status_code == 200 and "key 0a1b2c3d" in page.text
    assert ADMIN_KEY not in page.text and ADMIN_KEY.split("_")[2] not in cookie
    first_session = client.cookies["sg_session"]
    client.cookies.delete("sg_session")
    sign_in(client)
    assert client.cookies["sg_session"] != first_session, "every sign-in gets a new session id"


def test_secure_cookie_when_browsers_use_https() -> None:
    """Behind an https:// public URL the session cookie is Secure and __Host- prefixed."""
    backend = FakeBackend()
    url = "https://console.example.com"
    with make_client(backend, public_url=url, base_url=url) as client:
        token = token_of(client.get("/signin").text)
        response = client.post(
            "/signin", data={"csrf_token": token, "api_key": ADMIN_KEY}, headers={"origin": url}
        )
        cookie = next(
            c for c in response.headers.get_list("set-cookie") if c.startswith("__Host-sg_session=")
        )
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie


@pytest.mark.parametrize(
    ("key", "status", "message"),
    [
        (CLIENT_KEY, 401, "Key 0f0f0f0f is a client key: the console needs an admin key"),
        ("sgk_deadbeef_" + "C" * 43, 401, "The service refused key deadbeef: API key deadbeef is not valid."),
        ("", 422, "Enter an admin API key (sgk_…)."),
        ("two words", 422, "That is not a spendgate API key: it contains spaces or quotes"),
        ("sk-ant-api03-abc", 422, "That is not a spendgate API key: it looks like a provider"),
        (ADMIN_KEY[:-4], 422, "has 39 characters instead of 43: was the key cut short"),
    ],
)
def test_sign_in_refuses_other_keys_beside_the_field(
    harness: Harness, key: str, status: int, message: str
) -> None:
    """A client key, an unknown key or a non-key is refused, the reason shown beside the key field."""
    client, _, _ = harness
    response = sign_in(client, key)
    assert response.status_code == status
    block = field_block(response.text, "api_key")
    assert message in block and 'aria-invalid="true"' in block
    assert "sg_session" not in client.cookies


def test_sign_in_words_never_speak_grpc(harness: Harness) -> None:
    """No sign-in message names gRPC metadata, status codes or method paths."""
    client, backend, _ = harness
    pages = [sign_in(client, key).text for key in (CLIENT_KEY, "sgk_deadbeef_" + "C" * 43, "x y", "")]
    backend.unavailable = True
    down = sign_in(client)
    assert down.status_code == 503
    assert "The console cannot reach spendgate at 127.0.0.1:50051 (connection refused)" in down.text
    for text in [*pages, down.text]:
        message = field_block(text, "api_key")
        for jargon in (
            "metadata",
            "authorization:",
            "UNAUTHENTICATED",
            "PERMISSION_DENIED",
            "/spendgate.v1.",
        ):
            assert jargon not in message


def test_open_service_needs_no_key_and_says_so(harness: Harness) -> None:
    """Against a service without keys the sign-in page says it is open and goes on with one click."""
    client, backend, _ = harness
    backend.open = True
    page = client.get("/signin?next=/policies")
    assert page.status_code == 200
    assert "Open development mode" in page.text and "has no API keys" in page.text
    assert 'name="api_key"' not in page.text and "Continue without a key" in page.text
    response = client.post(
        "/signin",
        data={"csrf_token": token_of(page.text), "next": "/policies"},
        headers={"origin": ORIGIN},
    )
    assert response.status_code == 303 and response.headers["location"] == "/policies"
    assert "open development mode" in client.get("/policies").text


def test_keys_appearing_end_an_open_session(harness: Harness) -> None:
    """Once the service has keys, the keyless session ends and the page asks for a key."""
    client, backend, _ = harness
    backend.open = True
    token = token_of(client.get("/signin").text)
    client.post("/signin", data={"csrf_token": token}, headers={"origin": ORIGIN})
    backend.open = False
    response = client.get("/rules")
    assert response.status_code == 303 and response.headers["location"] == "/signin?ended=1"
    page = client.get("/signin?ended=1").text
    assert 'name="api_key"' in page and "Open development mode" not in page


def test_sign_in_page_shows_the_form_when_the_service_is_down(harness: Harness) -> None:
    """Whether the service is open cannot be told while it is down: the key form is shown."""
    client, backend, _ = harness
    backend.unavailable = True
    page = client.get("/signin")
    assert page.status_code == 200 and 'name="api_key"' in page.text


def test_sign_in_form_needs_its_csrf_cookie(harness: Harness) -> None:
    """A sign-in post without the form's double-submit cookie (e.g. from another site) is refused."""
    client, _, _ = harness
    token = token_of(client.get("/signin").text)
    client.cookies.delete("sg_signin")
    response = client.post(
        "/signin", data={"csrf_token": token, "api_key": ADMIN_KEY}, headers={"origin": ORIGIN}
    )
    assert response.status_code == 403 and "sg_session" not in client.cookies


def test_sign_in_returns_to_the_page_asked_for_and_nowhere_else(harness: Harness) -> None:
    """After sign-in the browser goes back to the page it wanted, but never to another site."""
    client, _, _ = harness
    for wanted, expected in (("/rules/history", "/rules/history"), ("//evil.example/x", "/rules")):
        client.cookies.clear()
        token = token_of(client.get("/signin", params={"next": wanted}).text)
        response = client.post(
            "/signin",
            data={"csrf_token": token, "api_key": ADMIN_KEY, "next": wanted},
            headers={"origin": ORIGIN},
        )
        assert response.headers["location"] == expected


def test_sign_out_forgets_the_session(harness: Harness) -> None:
    """After sign-out the old session cookie opens nothing."""
    client, _, _ = harness
    sign_in(client)
    session_id = client.cookies["sg_session"]
    token = token_of(client.get("/rules").text)
    response = client.post("/signout", data={"csrf_token": token}, headers={"origin": ORIGIN})
    assert response.status_code == 303 and response.headers["location"] == "/signin?signed_out=1"
    client.cookies.set("sg_session", session_id)
    assert client.get("/rules").status_code == 303


def test_idle_session_expires(harness: Harness) -> None:
    """A session unused for longer than the idle limit is gone."""
    client, _, clock = harness
    sign_in(client)
    clock.advance(599_000)
    assert client.get("/rules").status_code == 200
    clock.advance(601_000)
    assert client.get("/rules").status_code == 303


def test_a_key_the_service_stops_accepting_ends_the_session(harness: Harness) -> None:
    """When the service refuses the session's key (revoked), the session ends: sign in again."""
    client, backend, _ = harness
    sign_in(client)
    backend.accepted.clear()
    response = client.get("/rules")
    assert response.status_code == 303 and response.headers["location"] == "/signin?ended=1"
    backend.accepted.add(ADMIN_KEY)
    assert client.get("/rules").status_code == 303, "the session was forgotten, not just refused once"


def test_service_down_is_a_503_page(harness: Harness) -> None:
    """An unreachable service is answered with a page saying so, not a crash."""
    client, backend, _ = harness
    sign_in(client)
    backend.unavailable = True
    response = client.get("/rules")
    assert response.status_code == 503 and "spendgate is unreachable" in response.text


# --- cross-site requests


def test_cross_site_form_post_is_refused(harness: Harness) -> None:
    """A post from another origin, or without the session's CSRF token, is refused and changes nothing."""
    client, backend, _ = harness
    sign_in(client)
    form = rules_form(client, {"token_ceiling": "1"})
    attempts: list[tuple[dict[str, str], dict[str, str]]] = [
        (form, {"origin": "https://evil.example"}),
        (form, {"origin": "null"}),
        (form, {"origin": ORIGIN, "sec-fetch-site": "cross-site"}),
        (form, {"referer": "https://evil.example/page"}),
        (form, {}),  # neither Origin nor Referer
        ({**form, "csrf_token": "guessed"}, {"origin": ORIGIN}),
        ({k: v for k, v in form.items() if k != "csrf_token"}, {"origin": ORIGIN}),
    ]
    for data, headers in attempts:
        response = client.post("/rules", data=data, headers=headers)
        assert response.status_code == 403, headers
    assert backend.writes == 0
    same_origin_referer = client.post("/rules", data=form, headers={"referer": f"{ORIGIN}/rules"})
    assert same_origin_referer.status_code == 303 and backend.writes == 1


def test_unknown_host_is_refused(harness: Harness) -> None:
    """A Host header that is not the console's own (DNS rebinding) gets 400."""
    client, _, _ = harness
    assert client.get("/signin", headers={"host": "attacker.example:8080"}).status_code == 400
    assert client.get("/signin", headers={"host": "localhost:8080"}).status_code == 200


def test_security_headers_on_every_response(harness: Harness) -> None:
    """Pages and assets forbid framing, inline script and other origins, and pages are never cached."""
    client, _, _ = harness
    for response in (client.get("/signin"), client.get("/static/console.css"), client.get("/rules")):
        csp = response.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
        assert response.headers["x-content-type-options"] == "nosniff"
    assert client.get("/signin").headers["cache-control"] == "no-store"


# --- the Rules page


def test_rules_page_shows_the_config_and_shadow_per_rule(harness: Harness) -> None:
    """Stored rules fill the form, and each rule is marked off, enforced or shadow."""
    client, backend, _ = harness
    backend.write("", {"token_ceiling": 8000, "max_tool_calls": 5, "shadow": ["max_tool_calls"]})
    sign_in(client)
    html = client.get("/rules").text
    assert 'id="f-token_ceiling" name="token_ceiling" type="text" inputmode="numeric" value="8000"' in html
    assert re.search(r'id="f-shadow-max_tool_calls"[^>]*checked', html)
    assert not re.search(r'id="f-shadow-token_ceiling"[^>]*checked', html)
    badges = re.findall(r'id="rule-(\w+)">\s*<legend>.*?badge-(\w+)', html, re.S)
    assert dict(badges) == {
        "token_ceiling": "enforced",
        "max_session_usd": "off",
        "dedup_ttl_seconds": "off",
        "max_tool_calls": "shadow",
        "model_downgrade": "off",
    }


def test_save_writes_with_the_loaded_etag_and_reports_the_version(harness: Harness) -> None:
    """A valid form is written compare-and-set and the page reloads showing the new version."""
    client, backend, _ = harness
    sign_in(client)
    typed = {
        "token_ceiling": "4000",
        "max_session_usd": "$2.50",
        "budget_mode": "strict",
        "model_downgrade.threshold_usd": "0.25",
        "model_downgrade.fallback": "claude-haiku-4-5-20251001",
    }
    form = rules_form(client, typed)
    response = post_rules(client, {**form, "shadow": "dedup_ttl_seconds"})
    assert response.status_code == 303 and response.headers["location"] == "/rules?saved=1"
    assert backend.configs[""].rules == {
        "token_ceiling": 4000,
        "max_session_usd": "2.5",
        "budget_mode": "strict",
        "model_downgrade": {"threshold_usd": "0.25", "fallback": "claude-haiku-4-5-20251001"},
        "shadow": ["dedup_ttl_seconds"],
    }
    page = client.get("/rules?saved=1").text
    assert "Saved as version 1" in page and "+ token_ceiling: 4000" in page


def test_local_validation_errors_are_shown_beside_their_fields(harness: Harness) -> None:
    """Bad values are refused before any write, each message beside its field, the typed values kept."""
    client, backend, _ = harness
    sign_in(client)
    typed = {"token_ceiling": "lots", "max_tool_calls": "-3", "model_downgrade.threshold_usd": "0.1"}
    form = rules_form(client, typed)
    response = post_rules(client, form)
    assert response.status_code == 422 and backend.writes == 0
    html = response.text
    for html_id, message in (
        ("f-token_ceiling", "must be a whole number, got &#39;lots&#39;"),
        ("f-max_tool_calls", "must be between 0 and 1000000, got -3"),
        ("f-model_downgrade-fallback", "give both the threshold and the fallback model, or neither"),
    ):
        block = field_block(html, html_id)
        assert message in block and 'aria-invalid="true"' in block and f"{html_id}-error" in block
        assert f'href="#{html_id}"' in html, "the error summary links to the field"
    assert 'value="lots"' in html and "autofocus" in field_block(html, "f-token_ceiling")


def test_service_field_violations_are_shown_beside_their_fields(harness: Harness) -> None:
    """A google.rpc.BadRequest from the service lands beside the form field its wire path names."""
    client, backend, _ = harness
    sign_in(client)
    backend.reject = [
        FieldViolation("enforcement_config.model_downgrade.fallback_model", "no price is known for 'x'"),
        FieldViolation("something_else", "the service says no"),
    ]
    form = rules_form(client, {"model_downgrade.threshold_usd": "0.1", "model_downgrade.fallback": "x"})
    response = post_rules(client, form)
    assert response.status_code == 422
    assert "no price is known for &#39;x&#39;" in field_block(response.text, "f-model_downgrade-fallback")
    assert "the service says no" in response.text.split('class="error-summary"')[1]


def test_stale_edit_is_a_conflict_with_diffs_and_overwrites_nothing(harness: Harness) -> None:
    """When someone saved first, nothing is written; both diffs are shown and the edit is kept."""
    client, backend, _ = harness
    backend.write("batch", {"token_ceiling": 8000})
    sign_in(client)
    form = rules_form(client, {"token_ceiling": "8000", "max_tool_calls": "10"}, "batch")
    backend.write("batch", {"token_ceiling": 4000}, by="alice (99999999)")
    response = post_rules(client, form)
    assert response.status_code == 409 and backend.writes == 0
    assert backend.configs["batch"].rules == {"token_ceiling": 4000}
    html = response.text
    theirs, mine = html.split("What they changed")[1].split("Your edit compared")
    assert "~ token_ceiling: 8000 -&gt; 4000" in theirs
    assert (
        "~ token_ceiling: 4000 -&gt; 8000" in mine and "+ max_tool_calls: 10" in mine.split("</section>")[0]
    )
    assert "alice (99999999) saved version 2" in html
    assert 'name="etag" value="2"' in html and 'value="10"' in html
    again = post_rules(client, {**form, "etag": "2", "base_version": "2"})
    assert again.status_code == 303 and backend.configs["batch"].rules == {
        "token_ceiling": 8000,
        "max_tool_calls": 10,
    }


def test_a_corrected_form_still_detects_a_conflict(harness: Harness) -> None:
    """After a validation error the form keeps its loaded etag, so a later save cannot overwrite."""
    client, backend, _ = harness
    sign_in(client)
    form = rules_form(client, {"token_ceiling": "zero"})
    assert 'name="etag" value=""' in post_rules(client, form).text
    backend.write("", {"max_tool_calls": 3})
    assert post_rules(client, {**form, "token_ceiling": "100"}).status_code == 409
    assert backend.configs[""].rules == {"max_tool_calls": 3}


def test_history_diffs_every_revision_and_pages(harness: Harness) -> None:
    """History shows each revision's diff against the one before, 20 to a page."""
    client, backend, _ = harness
    for ceiling in range(1, 26):
        backend.write("", {"token_ceiling": ceiling * 100})
    sign_in(client)
    first = client.get("/rules/history").text
    assert first.count('class="revision-title"') == 20
    assert "~ token_ceiling: 2400 -&gt; 2500" in first and "~ token_ceiling: 500 -&gt; 600" in first
    older = re.search(r'href="(/rules/history\?page_token=20)"', first)
    assert older, "an Older changes link"
    second = client.get(older.group(1)).text
    assert second.count('class="revision-title"') == 5 and "+ token_ceiling: 100" in second
    assert "Older changes" not in second


def test_an_invalid_project_name_is_shown_beside_the_project_field(harness: Harness) -> None:
    """A project name the service could never accept is refused next to the project field."""
    client, _, _ = harness
    sign_in(client)
    response = client.get("/rules", params={"project": "no/slashes"})
    assert response.status_code == 400
    block = field_block(response.text, "open-project")
    assert "A project name is 1-64 characters" in block and 'aria-invalid="true"' in block


# --- the form's pure parts


def test_form_round_trips_every_rule() -> None:
    """A config shown in the form and submitted unchanged parses back to the same config."""
    config = EnforcementConfig(
        token_ceiling=9000,
        max_session_nano_usd=1_250_000_000,
        dedup_ttl_seconds=30,
        max_tool_calls=0,
        model_downgrade=ModelDowngrade(10_000_000, "claude-haiku-4-5-20251001"),
        shadow_rules=frozenset({Rule.TOOL_CALL_LIMIT, Rule.MODEL_DOWNGRADE}),
    )
    values = form_values(config_to_dict(config))
    form = {k: [v] for k, v in values.items() if k != "shadow"} | {"shadow": sorted(values["shadow"])}
    parsed, errors = parse_rules_form(form)
    assert errors == {} and parsed == config


def test_every_rule_has_a_section_and_all_shadowed_is_shadow_true() -> None:
    """The form covers every rule, and shadowing all of them is the config's ``shadow: true``."""
    assert {rule.key for rule in Rule} == set(RULE_KEYS)
    parsed, _ = parse_rules_form({"shadow": list(RULE_KEYS)})
    assert parsed is not None and config_to_dict(parsed) == {"shadow": True}
    assert rule_status({"token_ceiling": 5, "shadow": True}, "token_ceiling") == "shadow"
    assert rule_status({"shadow": True}, "max_tool_calls") == "off"


def test_service_field_paths_map_to_form_fields() -> None:
    """Every wire field of EnforcementConfig names a form field, so no service error floats free."""
    assert field_for_violation("enforcement_config.max_session_nano_usd") == "max_session_usd"
    assert field_for_violation("enforcement_config.model_downgrade.threshold_nano_usd") == (
        "model_downgrade.threshold_usd"
    )
    assert field_for_violation("enforcement_config.shadow_rules[2]") == "shadow"
    assert field_for_violation("model_downgrade.fallback") == "model_downgrade.fallback"
    assert field_for_violation("page_size") == ""


# --- settings


def parse_console_args(*argv: str) -> ConsoleSettings:
    parser = argparse.ArgumentParser()
    add_console_arguments(parser)
    return console_settings_from_args(parser.parse_args(argv))


def test_settings_off_loopback_need_a_public_url_and_https(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off loopback the console needs the origin browsers use, and HTTPS unless --insecure."""
    with pytest.raises(ConfigError, match="--public-url"):
        parse_console_args("--host", ALL_INTERFACES)
    with pytest.raises(ConfigError, match="in clear"):
        parse_console_args("--host", ALL_INTERFACES, "--public-url", "http://console.internal:8080")
    public = parse_console_args("--host", ALL_INTERFACES, "--public-url", "https://Console.Example.com:443/")
    assert public.secure_cookies and public.public_url == "https://console.example.com"
    with pytest.raises(ConfigError, match="SPENDGATE_CONSOLE_HTTPS_CERT"):
        parse_console_args("--https-cert", "/nonexistent/cert.pem", "--https-key", "/nonexistent/key.pem")
    with pytest.raises(ConfigError, match="SPENDGATE_CONSOLE_PORT"):
        parse_console_args("--port", "http")
    monkeypatch.setenv("SPENDGATE_CONSOLE_PROJECTS", "batch,web")
    monkeypatch.setenv("SPENDGATE_TARGET", "10.0.0.1:50051")
    settings = parse_console_args()
    assert settings.projects == ("batch", "web") and settings.target == "10.0.0.1:50051"


def test_allowed_origins_name_every_loopback_spelling() -> None:
    """On loopback, 127.0.0.1, localhost and [::1] on the bound port are the console's origins."""
    assert allowed_origins(ConsoleSettings(), 8080) == {
        "http://127.0.0.1:8080",
        "http://localhost:8080",
        "http://[::1]:8080",
    }
    public = ConsoleSettings(host=ALL_INTERFACES, public_url="https://c.example.com", https_cert="c.pem")
    assert allowed_origins(public, 443) == {"https://c.example.com"}


# --- the gRPC backend against a real server


@pytest.fixture
def keyed_server(
    spendgate: Callable[..., SpendgateServer], tmp_path: Path
) -> tuple[SpendgateServer, str, str]:
    keys_file = tmp_path / "keys.json"
    admin = create_key(keys_file, "acme", "admin", "ops")
    client = create_key(keys_file, "acme", "client", "agent")
    return spendgate("--keys-file", str(keys_file)), admin, client


async def test_backend_verifies_admin_keys_without_writing(
    keyed_server: tuple[SpendgateServer, str, str],
) -> None:
    """The admin probe accepts an admin key, refuses client and unknown keys, and writes nothing."""
    server, admin, client = keyed_server
    backend = GrpcBackend(server.target)
    try:
        await backend.verify_admin(admin)
        with pytest.raises(NotAuthorized, match="admin key"):
            await backend.verify_admin(client)
        with pytest.raises(NotAuthorized, match="not valid"):
            await backend.verify_admin(
                admin[:-4] + "AAAA" if not admin.endswith("AAAA") else admin[:-4] + "BBBB"
            )
        assert (await backend.list_revisions(admin, "", 10, "")).revisions == ()
    finally:
        await backend.close()


async def test_backend_tells_an_open_service_from_a_keyed_one(
    spendgate: Callable[..., SpendgateServer], keyed_server: tuple[SpendgateServer, str, str]
) -> None:
    """open_mode: True against a server without keys, False with keys; the answer is kept a while."""
    open_server = spendgate()
    clock = FakeClock()
    opened, keyed = (
        GrpcBackend(open_server.target, clock=lambda: clock.now_ms / 1000),
        GrpcBackend(keyed_server[0].target, clock=lambda: clock.now_ms / 1000),
    )
    try:
        assert await opened.open_mode() is True
        assert await keyed.open_mode() is False
        await opened.verify_admin("")  # no key at all: the open service takes the call
        open_server.stop()
        assert await opened.open_mode() is True, "kept: not asked again within the TTL"
        clock.advance(int(OPEN_MODE_TTL_SECONDS * 1000) + 1)
        with pytest.raises(BackendUnavailable, match="connection refused"):
            await opened.open_mode()
    finally:
        await opened.close()
        await keyed.close()


async def test_backend_maps_bad_request_conflict_and_history(
    keyed_server: tuple[SpendgateServer, str, str],
) -> None:
    """BadRequest violations, a stale etag and paged history come back as the console's own types."""
    server, admin, _ = keyed_server
    backend = GrpcBackend(server.target)
    try:
        unpriced = EnforcementConfig(model_downgrade=ModelDowngrade(1, "no-such-model-anywhere"))
        with pytest.raises(InvalidInput) as refused:
            await backend.update_config(admin, "", unpriced, "")
        assert [v.field for v in refused.value.violations] == [
            "enforcement_config.model_downgrade.fallback_model"
        ]
        first = await backend.update_config(admin, "web", EnforcementConfig(token_ceiling=100), "")
        second = await backend.update_config(admin, "web", EnforcementConfig(token_ceiling=50), first.etag)
        with pytest.raises(EditConflict):
            await backend.update_config(admin, "web", EnforcementConfig(token_ceiling=10), first.etag)
        assert (await backend.get_config(admin, "web")).rules == {"token_ceiling": 50}
        page = await backend.list_revisions(admin, "web", 1, "")
        assert [r.version for r in page.revisions] == [second.version]
        assert page.older is not None and page.older.rules == {"token_ceiling": 100}
        assert second.updated_by.startswith("ops (") and second.update_time is not None
    finally:
        await backend.close()


async def _old_update_config(request: cpb.UpdateConfigRequest, context: Any) -> cpb.UpdateConfigResponse:
    """UpdateConfig of a server from before PolicyService: auth first, then validation."""
    metadata = dict(context.invocation_metadata() or ())
    if metadata.get("authorization") != f"Bearer {ADMIN_KEY}":
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "needs an admin key")
    await abort(context, *rpc_status(InvalidArgument([FieldViolation("project", "must be ...")])))


async def test_backend_probes_an_older_server_without_writing() -> None:
    """Against a server without PolicyService, the admin check falls back to a write that cannot succeed."""
    server = grpc.aio.server()
    update = grpc.unary_unary_rpc_method_handler(
        _old_update_config,
        request_deserializer=cpb.UpdateConfigRequest.FromString,
        response_serializer=cpb.UpdateConfigResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("spendgate.v1.ConfigService", {"UpdateConfig": update}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    backend = GrpcBackend(f"127.0.0.1:{port}")
    try:
        await backend.verify_admin(ADMIN_KEY)
        with pytest.raises(NotAuthorized):
            await backend.verify_admin(CLIENT_KEY)
    finally:
        await backend.close()
        await server.stop(None)


async def test_backend_unreachable_is_unavailable() -> None:
    """No server at the target is BackendUnavailable, within the deadline."""
    backend = GrpcBackend(f"127.0.0.1:{free_port()}", timeout_seconds=1.0)
    try:
        with pytest.raises(BackendUnavailable):
            await backend.get_config(ADMIN_KEY, "")
    finally:
        await backend.close()
