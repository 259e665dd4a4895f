"""The web console end to end: a real server, a real console process, Debian's Chromium driven by Playwright.

Each page is photographed into tests/artifacts/ (gitignored); with
SPENDGATE_UPDATE_SCREENSHOTS=1 the pictures are also copied to docs/screenshots/ for the README.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from playwright.sync_api import BrowserContext, Page, Playwright, expect, sync_playwright
from spendgate.v1 import config_pb2 as cpb
from spendgate.v1 import config_pb2_grpc
from spendgate.v1 import decision_pb2 as pb
from spendgate_client import DecisionClient

from tests.ensure_chromium import ensure as ensure_chromium
from tests.processes import STARTUP_SECONDS, SpendgateServer, stop_process
from tests.test_security import bearer, create_key

# Installs Debian's chromium when it is missing and this runs as root; skips only when it cannot.
CHROMIUM, MISSING = ensure_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=MISSING)

ROOT = Path(__file__).resolve().parent.parent
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


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    keys_file = tmp_path_factory.mktemp("console-keys") / "keys.json"
    admin = create_key(keys_file, "acme", "admin", "ops")
    client = create_key(keys_file, "acme", "client", "agent")
    server = SpendgateServer.start("--keys-file", str(keys_file))
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


def test_other_pages_keyboard_and_phone_width(page: Page, stack: Stack) -> None:
    """Every page is in the navigation, controls have labels and visible focus, phones need no side-scroll."""
    sign_in(page, stack)
    for title, name in (("Policies", "policies"), ("Violations", "violations"), ("Sessions", "sessions")):
        page.get_by_role("navigation", name="Main").get_by_role("link", name=title).click()
        expect(page.get_by_role("heading", level=1)).to_have_text(title)
        screenshot(page, name)

    page.goto(stack.console.url + "/rules")
    unlabelled = page.evaluate(
        "[...document.querySelectorAll('input:not([type=hidden]), select, button')]"
        ".filter(e => e.tagName === 'BUTTON' ? !e.textContent.trim() : !(e.labels && e.labels.length))"
        ".map(e => e.name || e.id)"
    )
    assert unlabelled == []
    page.keyboard.press("Tab")
    skip = page.get_by_role("link", name="Skip to content")
    expect(skip).to_be_focused()
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"
    page.keyboard.press("Enter")
    expect(page.locator("main")).to_be_focused()

    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(stack.console.url + "/rules")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    screenshot(page, "rules-phone")


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
