"""The web console end to end: a real server, a real console process, Debian's Chromium driven by Playwright.

The server runs the memory store with its policy evaluator embedded, so a call settled
through the Python DecisionClient reaches the alerts feed within moments. Each page is
photographed into tests/artifacts/ (gitignored); with SPENDGATE_UPDATE_SCREENSHOTS=1 the
pictures are also copied to docs/screenshots/ for the README.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from playwright.sync_api import BrowserContext, Page, Playwright, ViewportSize, expect, sync_playwright
from spendgate.v1 import config_pb2 as cpb
from spendgate.v1 import config_pb2_grpc, policy_pb2_grpc
from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import policy_pb2 as ppb
from spendgate_client import DecisionClient

from tests.ensure_chromium import ensure as ensure_chromium
from tests.integration.test_security import bearer, create_key
from tests.processes import STARTUP_SECONDS, SpendgateServer, stop_process

# Installs Debian's chromium when it is missing and this runs as root; skips only when it cannot.
CHROMIUM, MISSING = ensure_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=MISSING)

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
SCREENSHOTS = ROOT / "docs" / "screenshots"
# Playwright's own headless defaults plus what keeps Chromium off the network and out of the sandbox
# (which needs namespaces a CI container may not grant); the profile is a new empty directory.
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MILLIS = 15_000
MODEL = "claude-sonnet-4-5"
UNAPPROVED_MODEL = "claude-haiku-4-5-20251001"
SECRET = "sk-live-Zq8Xv2LmN4pR7tY1uW9eB3cD5fG6hJ0kQ"  # noqa: S105  # fake: the feed must never show it
PHONE: ViewportSize = {"width": 390, "height": 844}


@dataclass
class ConsoleProcess:
    """A ``spendgate console`` process on a free port."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, target: str, *args: str) -> ConsoleProcess:
        log = Path(tempfile.mkstemp(prefix="sg-console-", suffix=".log")[1])
        argv = [sys.executable, "-m", "spendgate_server", "console", "--port", "0", "--target", target]
        with log.open("wb") as sink:
            process = subprocess.Popen([*argv, "--log-format", "json", *args], stdout=sink, stderr=sink)
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            for line in log.read_text().splitlines():
                if line.startswith("{") and json.loads(line).get("event") == "console_serving":
                    return cls(process, json.loads(line)["port"], log)
            if process.poll() is not None:
                raise RuntimeError(f"spendgate console exited {process.returncode}:\n{log.read_text()}")
            time.sleep(0.05)
        stop_process(process)
        raise RuntimeError(f"spendgate console did not report serving:\n{log.read_text()}")

    def stop(self) -> None:
        stop_process(self.process)


@dataclass
class Stack:
    """A keyed server, a console in front of it, and the keys."""

    server: SpendgateServer
    console: ConsoleProcess
    admin_key: str
    client_key: str

    def config_stub(self, channel: grpc.Channel) -> config_pb2_grpc.ConfigServiceStub:
        return config_pb2_grpc.ConfigServiceStub(channel)

    def stored(self, project: str = "") -> cpb.Config:
        """The config as the service has it now."""
        with grpc.insecure_channel(self.server.target) as channel:
            request = cpb.GetConfigRequest(project=project)
            return self.config_stub(channel).GetConfig(request, metadata=bearer(self.admin_key)).config

    def write_as_someone_else(self, project: str, config: pb.EnforcementConfig) -> cpb.Config:
        """Another admin saves through the API (read, then compare-and-set)."""
        with grpc.insecure_channel(self.server.target) as channel:
            stub = self.config_stub(channel)
            etag = self.stored(project).etag
            request = cpb.UpdateConfigRequest(project=project, enforcement_config=config, etag=etag)
            return stub.UpdateConfig(request, metadata=bearer(self.admin_key)).config

    def policies(self) -> ppb.PolicySet:
        """The policies as the service has them now."""
        with grpc.insecure_channel(self.server.target) as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            return stub.GetPolicies(ppb.GetPoliciesRequest(), metadata=bearer(self.admin_key)).policy_set

    def write_policies_as_someone_else(self, change: Callable[[ppb.Policies], None]) -> ppb.PolicySet:
        """Another admin changes the policies through the API (read, change, compare-and-set)."""
        current = self.policies()
        policies = ppb.Policies()
        policies.CopyFrom(current.policies)
        change(policies)
        with grpc.insecure_channel(self.server.target) as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            request = ppb.UpdatePoliciesRequest(policies=policies, etag=current.etag)
            return stub.UpdatePolicies(request, metadata=bearer(self.admin_key)).policy_set

    def call(
        self,
        session: str,
        model: str,
        *,
        fingerprint: bytes | None = None,
        config: dict[str, Any] | None = None,
        **context: Any,
    ) -> bool:
        """Decide one call through the Python client and settle it when allowed; True when allowed."""
        client = DecisionClient(self.server.target, api_key=self.client_key, fail_mode="closed", timeout=5)
        try:
            decision = client.decide(
                session, model, 100, 500, fingerprint or uuid.uuid4().bytes, enforcement_config=config
            )
            if decision.allowed:
                settled = client.settle(
                    session, decision.reservation_id, model, input_tokens=100, output_tokens=500, **context
                )
                assert settled is not None
            return decision.allowed
        finally:
            client.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    keys_file = tmp_path_factory.mktemp("console-keys") / "keys.json"
    admin = create_key(keys_file, "acme", "admin", "ops")
    client = create_key(keys_file, "acme", "client", "agent")
    # The evaluator is embedded (memory store) and polls quickly, so violations arrive at once.
    server = SpendgateServer.start("--keys-file", str(keys_file), "--evaluator-poll-millis", "20")
    try:
        console = ConsoleProcess.start(server.target, "--project", "batch", "--project", "web")
    except BaseException:
        server.stop()
        raise
    yield Stack(server, console, admin, client)
    console.stop()
    server.stop()


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    """Debian's Chromium with a new empty profile (Playwright's own browser build is never used)."""
    context = playwright.chromium.launch_persistent_context(
        str(tmp_path_factory.mktemp("chromium-profile")),
        executable_path=str(CHROMIUM),
        headless=True,
        args=LAUNCH_ARGS,
        viewport={"width": 1280, "height": 900},
        locale="en-US",
        timezone_id="UTC",
        reduced_motion="reduce",
    )
    context.set_default_timeout(TIMEOUT_MILLIS)
    yield context
    context.close()


@pytest.fixture
def page(browser: BrowserContext) -> Iterator[Page]:
    """A fresh tab with no cookies: every test starts signed out."""
    browser.clear_cookies()
    tab = browser.new_page()
    yield tab
    tab.close()


def screenshot(page: Page, name: str) -> None:
    """Keep a picture of the page as a test artifact (and for the README when asked to)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True, animations="disabled", caret="hide")
    if os.environ.get("SPENDGATE_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, SCREENSHOTS / path.name)


def sign_in(page: Page, stack: Stack, path: str = "/rules", key: str | None = None) -> None:
    """Sign in with the keyboard only: the key field has focus, type, press Enter."""
    page.goto(stack.console.url + path)
    expect(page).to_have_url(f"{stack.console.url}/signin?next={path}")
    expect(page.locator("#api_key")).to_be_focused()
    page.keyboard.type(key or stack.admin_key)
    page.keyboard.press("Enter")


def decide(stack: Stack, session: str, input_tokens: int) -> tuple[str, str | None, bool]:
    """One Decide through the Python client: verdict, rule, would_block."""
    client = DecisionClient(stack.server.target, api_key=stack.client_key, fail_mode="closed", timeout=5)
    try:
        decision = client.decide(session, MODEL, input_tokens, 100, uuid.uuid4().bytes)
    finally:
        client.close()
    return decision.verdict, decision.rule, decision.would_block


def save(page: Page) -> None:
    page.get_by_role("button", name="Save rules").click()


def save_policies(page: Page) -> None:
    page.get_by_role("button", name="Save policies").click()


def watch_for_csp_errors(page: Page) -> list[str]:
    """Collect the console errors of ``page`` (a script or style refused by the CSP would be one)."""
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    return errors


def test_sign_in_change_a_rule_and_the_next_decision_changes(page: Page, stack: Stack) -> None:
    """After an admin signs in, a lower token ceiling blocks the next call; shadowing it allows it again."""
    page.goto(stack.console.url + "/")
    screenshot(page, "signin")
    sign_in(page, stack)
    expect(page.get_by_role("heading", level=1)).to_contain_text("Rules")
    session = f"e2e-{uuid.uuid4().hex[:8]}"
    assert decide(stack, session, 5000)[0] == "allow"

    page.get_by_label("Most input tokens per call").fill("1000")
    save(page)
    expect(page.get_by_role("status")).to_contain_text("Saved as version")
    expect(page.locator("#rule-token_ceiling .badge")).to_have_text("Enforced")
    assert decide(stack, session, 5000)[:2] == ("block", "token_ceiling")

    page.get_by_label("Shadow mode for token ceiling").check()
    save(page)
    expect(page.locator("#rule-token_ceiling .badge")).to_have_text("Shadow: reports, never blocks")
    assert decide(stack, session, 5000) == ("allow", None, True)
    expect(page.locator(".history .diff-added").first).to_contain_text('+ shadow: ["token_ceiling"]')
    screenshot(page, "rules")


def test_validation_errors_appear_beside_their_fields(page: Page, stack: Stack) -> None:
    """A bad number and a fallback model the service cannot price are each shown beside their field."""
    sign_in(page, stack)
    before = stack.stored().version
    page.get_by_label("Most input tokens per call").fill("a lot")
    save(page)
    field = page.locator(".field", has=page.locator("#f-token_ceiling"))
    expect(field.locator(".error")).to_contain_text("must be a whole number, got 'a lot'")
    expect(page.locator("#f-token_ceiling")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#f-token_ceiling")).to_be_focused()

    page.get_by_label("Most input tokens per call").fill("")
    page.get_by_label("Threshold per call, US dollars").fill("0.01")
    page.get_by_label("Fallback model").fill("no-such-model-anywhere")
    save(page)
    # This one only the service knows: it arrives as a google.rpc.BadRequest field violation.
    fallback = page.locator(".field", has=page.locator("#f-model_downgrade-fallback"))
    expect(fallback.locator(".error")).to_contain_text("no price is known for 'no-such-model-anywhere'")
    expect(page.locator(".error-summary")).to_contain_text("Model downgrade, fallback model")
    screenshot(page, "rules-validation-error")
    assert stack.stored().version == before, "nothing was saved"


def test_a_stale_edit_is_shown_as_a_conflict_and_overwrites_nothing(page: Page, stack: Stack) -> None:
    """When someone saves first, the editor sees both diffs; only a deliberate second save replaces theirs."""
    sign_in(page, stack)
    page.get_by_role("link", name="batch").click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("project batch")
    page.get_by_label("Most tool calls per session").fill("10")

    theirs = stack.write_as_someone_else("batch", pb.EnforcementConfig(token_ceiling=4000))
    save(page)
    conflict = page.get_by_role("alert").filter(has_text="someone else saved first")
    expect(conflict).to_contain_text(f"saved version {theirs.version}")
    expect(conflict.locator(".diff").first).to_contain_text("+ token_ceiling: 4000")
    expect(conflict.locator(".diff").last).to_contain_text("- token_ceiling: 4000")
    expect(conflict.locator(".diff").last).to_contain_text("+ max_tool_calls: 10")
    expect(page.get_by_label("Most tool calls per session")).to_have_value("10")
    screenshot(page, "rules-conflict")
    stored = stack.stored("batch")
    assert (stored.version, stored.enforcement_config.token_ceiling) == (theirs.version, 4000)
    assert not stored.enforcement_config.HasField("max_tool_calls")

    page.get_by_role("button", name=f"Replace version {theirs.version} with my edit").click()
    expect(page.get_by_role("status")).to_contain_text("Saved as version")
    replaced = stack.stored("batch").enforcement_config
    assert replaced.max_tool_calls == 10 and not replaced.HasField("token_ceiling")

    page.goto(stack.console.url + "/rules/history?project=batch")
    expect(page.locator(".revisions > li")).to_have_count(2)
    screenshot(page, "rules-history")


def test_a_bad_pattern_is_refused_beside_its_row_with_re2s_reason(page: Page, stack: Stack) -> None:
    """A bad regular expression comes back from the service as RE2's message beside its row, unsaved."""
    sign_in(page, stack, "/policies")
    expect(page.get_by_role("heading", level=1)).to_contain_text("Policies")
    before = stack.policies().version
    page.get_by_label("Approved models, one per line").fill(MODEL)
    page.get_by_label("Pattern 1 Id").fill("live-key")
    page.get_by_label("Pattern 1 RE2 expression").fill("sk-live-[A-Za-z0-9]+")
    page.get_by_label("Pattern 2 Id").fill("injection")
    page.get_by_label("Pattern 2 RE2 expression").fill("(?<=look)behind")
    save_policies(page)
    row = page.locator(".field", has=page.locator("#f-banned_patterns-1-pattern"))
    expect(row.locator(".error")).to_contain_text(
        "RE2 refuses '(?<=look)behind': invalid perl operator: (?<="
    )
    expect(page.locator("#f-banned_patterns-1-pattern")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#f-banned_patterns-0-pattern")).not_to_have_attribute("aria-invalid", "true")
    expect(page.locator(".error-summary")).to_contain_text("Banned pattern 2, pattern")
    screenshot(page, "policies-validation-error")
    assert stack.policies().version == before, "nothing was saved"

    page.get_by_label("Pattern 2 RE2 expression").fill("ignore (all )?previous instructions")
    save_policies(page)
    expect(page.get_by_role("status")).to_contain_text("Saved as version")
    expect(page.locator("#policy-banned_patterns .badge")).to_have_text("On")
    assert [p.id for p in stack.policies().policies.banned_patterns] == ["live-key", "injection"]


def test_a_stale_policy_edit_is_a_conflict_and_overwrites_nothing(page: Page, stack: Stack) -> None:
    """When another admin saves policies first, the editor sees both diffs; a second save replaces."""
    sign_in(page, stack, "/policies")
    page.get_by_label("Threshold per call, US cents").fill("250")

    def add_key_rule(policies: ppb.Policies) -> None:
        policies.key_environment_check.add(key_label="ci-key", environments=["staging"])

    theirs = stack.write_policies_as_someone_else(add_key_rule)
    save_policies(page)
    conflict = page.get_by_role("alert").filter(has_text="someone else saved first")
    expect(conflict).to_contain_text(f"saved version {theirs.version}")
    expect(conflict.locator(".diff").first).to_contain_text(
        '+ key_environment_check[label ci-key]: ["staging"]'
    )
    expect(conflict.locator(".diff").last).to_contain_text("+ approval_required_threshold_cents: 250")
    expect(conflict.locator(".diff").last).to_contain_text("- key_environment_check[label ci-key]")
    expect(page.get_by_label("Threshold per call, US cents")).to_have_value("250")
    screenshot(page, "policies-conflict")
    stored = stack.policies()
    assert stored.version == theirs.version
    assert not stored.policies.HasField("approval_required_threshold_cents")

    page.get_by_role("button", name=f"Replace version {theirs.version} with my edit").click()
    expect(page.get_by_role("status")).to_contain_text("Saved as version")
    assert stack.policies().policies.approval_required_threshold_cents == 250
    screenshot(page, "policies")


def test_a_violation_appears_in_the_live_feed_without_reloading(page: Page, stack: Stack) -> None:
    """A call breaking policies set here shows up live, filtered, with the secret it held redacted."""
    csp_errors = watch_for_csp_errors(page)
    sign_in(page, stack, "/policies")
    page.get_by_label("Approved models, one per line").fill(MODEL)
    page.get_by_label("Pattern 1 Id").fill("live-key")
    page.get_by_label("Pattern 1 RE2 expression").fill("sk-live-")
    page.get_by_label("Journal prompt text").check()
    save_policies(page)
    expect(page.get_by_role("status")).to_contain_text("Saved as version")

    session = f"agent-{uuid.uuid4().hex[:8]}"
    page.goto(f"{stack.console.url}/violations?session={session}")
    expect(page.locator("#live-status")).to_contain_text("Live:")
    page.evaluate("window.notReloaded = true")
    assert stack.call(f"other-{uuid.uuid4().hex[:8]}", UNAPPROVED_MODEL), "another session's violation"
    prompt = f"You are helpful.\nmy key is {SECRET} why does it fail?"
    assert stack.call(session, UNAPPROVED_MODEL, project="web", environment="dev", prompt_text=prompt)

    feed = page.locator("#violations > li")
    expect(feed).to_have_count(2)
    expect(feed.filter(has_text="Unapproved model")).to_contain_text(
        f"model {UNAPPROVED_MODEL} ran and is not in approved_models"
    )
    banned = feed.filter(has_text="Banned pattern")
    expect(banned).to_contain_text("Prompt matched banned pattern live-key at offset 27")
    expect(banned).to_contain_text("my key is [REDACTED] why does it fail?")
    expect(page.locator("#live-status")).to_contain_text("2 new since the page opened")
    expect(page.locator("#summary-empty")).to_have_text(
        "2 found since the page opened: reload to see them grouped."
    )
    assert page.evaluate("window.notReloaded") is True, "the page was never reloaded"
    assert SECRET[8:] not in page.content()
    # The other session's violation was found first: filtered out by the stream, not merely late.
    expect(feed).to_have_count(2)
    screenshot(page, "violations-live")

    # Unfiltered: the last day grouped by policy and what broke it, one row per kind.
    page.goto(stack.console.url + "/violations")
    groups = page.locator("table.groups tbody tr")
    expect(groups).to_have_count(2)
    unapproved = page.locator(f'tr[data-group="approved_models:{UNAPPROVED_MODEL}"]')
    expect(unapproved.locator(".group-count")).to_have_text("2")
    expect(page.locator('tr[data-group="banned_patterns:live-key"] .group-count')).to_have_text("1")
    # A runaway loop: eight more alike violations in three sessions are counted live in their row.
    expect(page.locator("#live-status")).to_contain_text("Live:")
    for i in range(8):
        assert stack.call(f"loop-{i % 3}-{session}", UNAPPROVED_MODEL, project="batch")
    expect(page.locator("#violations > li")).to_have_count(11)
    expect(unapproved.locator(".group-count")).to_have_text("10")
    page.reload()
    expect(unapproved.locator(".group-count")).to_have_text("10")
    expect(unapproved.locator("td.num").nth(1)).to_have_text("5")  # sessions: other, agent, 3 loops
    expect(page.locator("#summary-text")).to_contain_text("11 violations of 2 kinds in 5 sessions")
    expect(page.get_by_role("img", name=re.compile(r"^Violations per minute, .* 11 in all"))).to_be_visible()
    screenshot(page, "violations")
    page.set_viewport_size(PHONE)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    screenshot(page, "violations-phone")
    assert csp_errors == []


def test_sessions_page_shows_spend_budget_and_blocked_calls(page: Page, stack: Stack) -> None:
    """A session that spent and had a call blocked shows its budget bar, blocked count and chart."""
    session = f"support-{uuid.uuid4().hex[:8]}"
    config = {"max_session_usd": 0.05, "dedup_ttl_seconds": 60}
    repeated = uuid.uuid4().bytes
    for i in range(3):
        assert stack.call(session, MODEL, fingerprint=repeated if i == 0 else None, config=config)
    assert not stack.call(session, MODEL, fingerprint=repeated, config=config), "the duplicate is blocked"
    stack.call(f"batch-{uuid.uuid4().hex[:8]}", MODEL)

    # DecisionClient.decide names no project (only settle does), so these sessions have none to filter by.
    sign_in(page, stack, "/sessions")
    card = page.locator(".session-card", has_text=session)
    deadline = time.monotonic() + TIMEOUT_MILLIS / 1000
    # Servers flush session figures about once a second: reload until they arrive.
    while card.locator(".blocked").count() == 0:
        assert time.monotonic() < deadline, "the session never appeared with its blocked call"
        time.sleep(0.25)
        page.reload()
    expect(card.locator(".budget-text")).to_contain_text(" of $0.05 (")
    expect(card.locator("meter")).to_have_accessible_name("Budget used")
    expect(card.locator(".blocked")).to_contain_text("Duplicate requests (dedup_ttl_seconds): 1")
    expect(card.get_by_role("img")).to_have_accessible_name(
        re.compile(r"^Settled spend per minute, .* in all")
    )
    expect(card.locator("svg rect")).to_have_count(1)
    # One bar among the ten minutes the chart spans at least, with its amount written above it.
    expect(card.locator("svg text.chart-label")).to_have_text(re.compile(r"^\$0\.0\d+$"))
    screenshot(page, "sessions")
    page.set_viewport_size(PHONE)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    screenshot(page, "sessions-phone")


def test_every_page_keyboard_labels_and_phone_width(page: Page, stack: Stack) -> None:
    """Every page is in the navigation, controls have labels and visible focus, phones need no side-scroll."""
    sign_in(page, stack)
    for title in ("Policies", "Violations", "Sessions", "Rules"):
        page.get_by_role("navigation", name="Main").get_by_role("link", name=title).click()
        expect(page.get_by_role("heading", level=1)).to_contain_text(title)
        unlabelled = page.evaluate(
            "[...document.querySelectorAll('input:not([type=hidden]), select, textarea, button, meter')]"
            ".filter(e => e.tagName === 'BUTTON' ? !e.textContent.trim() : !(e.labels && e.labels.length))"
            ".map(e => e.name || e.id)"
        )
        assert unlabelled == [], title

    page.keyboard.press("Tab")
    skip = page.get_by_role("link", name="Skip to content")
    expect(skip).to_be_focused()
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"
    page.keyboard.press("Enter")
    expect(page.locator("main")).to_be_focused()

    page.set_viewport_size(PHONE)
    for path, name in (("/rules", "rules-phone"), ("/policies", "policies-phone")):
        page.goto(stack.console.url + path)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), path
        screenshot(page, name)


def test_a_malformed_key_is_refused_in_words(page: Page, stack: Stack) -> None:
    """A key cut short, or a provider's key, is refused beside the field with what is wrong with it."""
    sign_in(page, stack, key=stack.admin_key[:-5])
    error = page.locator("#api_key-error")
    expect(error).to_contain_text(
        "That is not a spendgate API key: the secret after the key id has 38 characters"
    )
    page.get_by_label("Admin API key").fill("sk-ant-api03-abcdef")
    page.get_by_role("button", name="Sign in").click()
    expect(error).to_contain_text("it looks like a provider's API key")
    screenshot(page, "signin-error")


def test_an_open_server_needs_no_key_and_the_console_says_so(page: Page) -> None:
    """Against a server without keys (make run's default) the console says so and goes on in one click."""
    server = SpendgateServer.start()
    console = ConsoleProcess.start(server.target)
    try:
        page.goto(console.url + "/sessions")
        expect(page.get_by_role("heading", level=1)).to_have_text("Open development mode")
        expect(page.locator("main")).to_contain_text("has no API keys")
        expect(page.locator("#api_key")).to_have_count(0)
        screenshot(page, "signin-open")
        page.get_by_role("button", name="Continue without a key").click()
        expect(page).to_have_url(console.url + "/sessions")
        expect(page.locator(".who")).to_have_text("open development mode")
        for title in ("Rules", "Policies", "Violations", "Sessions"):
            page.get_by_role("navigation", name="Main").get_by_role("link", name=title).click()
            expect(page.get_by_role("heading", level=1)).to_contain_text(title)
    finally:
        console.stop()
        server.stop()


def test_client_key_is_refused_and_sign_out_ends_the_session(page: Page, stack: Stack) -> None:
    """A client key cannot sign in; after signing out the pages ask for a key again."""
    sign_in(page, stack, key=stack.client_key)
    expect(page.locator("#api_key-error")).to_contain_text("admin key")
    page.get_by_label("Admin API key").fill(stack.admin_key)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(stack.console.url + "/rules")
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("status")).to_have_text("You are signed out.")
    page.goto(stack.console.url + "/rules")
    expect(page).to_have_url(f"{stack.console.url}/signin?next=/rules")


def test_a_cross_site_form_post_is_refused(page: Page, stack: Stack) -> None:
    """Another site's auto-submitting form, posted while signed in, is refused and changes nothing."""
    sign_in(page, stack)
    expect(page).to_have_url(stack.console.url + "/rules")
    before = stack.stored().version
    attack = (
        f'<form id="f" method="post" action="{stack.console.url}/rules">'
        '<input name="token_ceiling" value="1"><input name="etag" value=""></form>'
        "<script>document.getElementById('f').submit()</script>"
    )
    page.route("http://attacker.test/**", lambda route: route.fulfill(content_type="text/html", body=attack))
    with page.expect_response(lambda r: r.url.endswith("/rules") and r.request.method == "POST") as posted:
        page.goto("http://attacker.test/")
    assert posted.value.status == 403
    expect(page.get_by_role("heading", level=1)).to_have_text("Refused")
    assert stack.stored().version == before
