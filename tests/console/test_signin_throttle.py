"""Console sign-in throttle (issue 18, item 4c): failed sign-ins slow their address down."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

import pytest
from hypothesis import given
from hypothesis import strategies as st
from spendgate_server.console.app import allowed_origins, create_app
from spendgate_server.console.settings import ConsoleSettings
from spendgate_server.console.throttle import SignInThrottle
from starlette.testclient import TestClient

from tests.conftest import FakeClock
from tests.console.test_console import ORIGIN, FakeBackend, sign_in, token_of
from tests.console.test_console_browser import ConsoleProcess
from tests.integration.test_security import create_key
from tests.processes import SpendgateServer

WRONG_KEY = "sgk_deadbeef_" + "C" * 43


class Seconds:
    """A settable clock in seconds."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_five_attempts_are_free_then_each_failure_doubles_the_wait_up_to_the_cap() -> None:
    """Waits after failures 5, 6, 7, ... are 1, 2, 4, ... seconds, never above 300."""
    clock = Seconds()
    throttle = SignInThrottle(clock=clock)
    waits = []
    for _ in range(20):
        throttle.failed("a")
        waits.append(throttle.retry_after_seconds("a"))
    assert waits[:4] == [0, 0, 0, 0]
    assert waits[4:11] == [1, 2, 4, 8, 16, 32, 64]
    assert max(waits) == 300 and waits[-1] == 300
    assert throttle.retry_after_seconds("b") == 0, "another address is not slowed"
    clock.now += 299.5
    assert throttle.retry_after_seconds("a") == 1
    clock.now += 0.5
    assert throttle.retry_after_seconds("a") == 0


def test_success_and_an_hour_without_failures_clear_an_address() -> None:
    """A good sign-in forgets the failures; so does an hour without one."""
    clock = Seconds()
    throttle = SignInThrottle(clock=clock)
    for _ in range(8):
        throttle.failed("a")
        throttle.failed("b")
    throttle.succeeded("a")
    assert throttle.retry_after_seconds("a") == 0
    clock.now += 3600
    assert throttle.retry_after_seconds("b") == 0 and throttle.tracked() == 0


@given(st.lists(st.integers(0, 50), max_size=400))
def test_memory_is_bounded_by_max_addresses(addresses: list[int]) -> None:
    """However many addresses fail, at most max_addresses are remembered, the latest kept."""
    throttle = SignInThrottle(max_addresses=10, clock=Seconds())
    for address in addresses:
        throttle.failed(str(address))
    assert throttle.tracked() == min(10, len(set(addresses)))
    if addresses:
        throttle.failed(str(addresses[-1]))
        assert throttle.tracked() <= 10


class CountingBackend(FakeBackend):
    """The fake backend, counting the keys it was asked to verify."""

    def __init__(self) -> None:
        super().__init__()
        self.verified = 0

    async def verify_admin(self, api_key: str) -> None:
        self.verified += 1
        await super().verify_admin(api_key)


def test_three_hundred_wrong_keys_reach_the_service_five_times_then_get_429() -> None:
    """The issue's 300 wrong keys in a burst: 5 are checked, 295 refused with Retry-After; other
    addresses are untouched; after the wait the right key signs in and clears the address."""
    backend, clock = CountingBackend(), FakeClock()
    settings = ConsoleSettings(port=8080)

    def client(address: str) -> TestClient:
        app = create_app(
            backend_factory=lambda: backend,
            origins=allowed_origins(settings, 8080),
            secure_cookies=False,
            target="127.0.0.1:50051",
            clock=lambda: clock.now_ms / 1000,
        )
        return TestClient(app, base_url=ORIGIN, follow_redirects=False, client=(address, 40000))

    with client("192.0.2.7") as attacker:
        token = token_of(attacker.get("/signin").text)
        statuses = []
        for _ in range(300):
            # Each answer is the form again, with a fresh token (and its cookie): use it, as a browser would.
            statuses.append(
                attacker.post(
                    "/signin", data={"csrf_token": token, "api_key": WRONG_KEY}, headers={"origin": ORIGIN}
                )
            )
            token = token_of(statuses[-1].text)
        assert [r.status_code for r in statuses[:5]] == [401] * 5
        assert {r.status_code for r in statuses[5:]} == {429}
        assert backend.verified == 5
        refused = statuses[-1]
        assert refused.headers["retry-after"] == "1"
        assert "Too many failed sign-ins from your address; try again in 1 s." in refused.text
        assert sign_in(attacker).status_code == 429, "even the right key waits: checking it is the cost"
        clock.advance(1000)
        assert sign_in(attacker).status_code == 303
        attacker.cookies.delete("sg_session")
        assert sign_in(attacker, WRONG_KEY).status_code == 401, "a success cleared the address"


@pytest.mark.parametrize("attempts", [300])
def test_a_real_console_slows_a_burst_of_wrong_keys(
    spendgate: Callable[..., SpendgateServer], tmp_path: Path, attempts: int
) -> None:
    """`spendgate console` before a keyed server: a burst of wrong keys mostly gets 429, and the
    service is asked about only a handful of them."""
    keys = tmp_path / "keys.json"
    create_key(keys, "acme", "admin", "ops")
    server = spendgate("--keys-file", str(keys))
    console = ConsoleProcess.start(server.target)
    try:
        web = http.client.HTTPConnection("127.0.0.1", console.port, timeout=10)
        web.request("GET", "/signin")
        form_page = web.getresponse()
        cookie = form_page.getheader("set-cookie", "").split(";")[0]
        token = token_of(form_page.read().decode())
        body = urlencode({"csrf_token": token, "api_key": WRONG_KEY})
        headers = {
            "origin": console.url,
            "cookie": cookie,
            "content-type": "application/x-www-form-urlencoded",
        }
        started = time.monotonic()
        codes = []
        for _ in range(attempts):
            web.request("POST", "/signin", body=body, headers=headers)
            response = web.getresponse()
            response.read()
            codes.append(response.status)
        elapsed = time.monotonic() - started
        web.close()
    finally:
        console.stop()
    # Each refusal doubles the wait, so however long the burst took only a few keys were checked.
    checked = codes.count(401)
    assert codes[:5] == [401] * 5 and codes.count(429) == attempts - checked
    assert checked <= 5 + max(1, int(elapsed).bit_length() + 1), (checked, elapsed)
    events = [json.loads(line) for line in console.log_path.read_text().splitlines() if line.startswith("{")]
    asked = [e for e in events if e.get("event") == "console_signin_refused"]
    throttled = [e for e in events if e.get("event") == "console_signin_throttled"]
    assert (len(asked), len(throttled)) == (checked, attempts - checked)
