"""Settles are off the caller's path and never lost: retried through outages, flushed on close and exit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from spendgate_client import AsyncJournaledOpenAI, JournaledAnthropic

from tests.fake_provider import BIG, PRICES_YAML, FakeProvider, Usage, cost, new_session, session_spend
from tests.processes import SpendgateServer, free_port

ROOT = Path(__file__).parents[2]


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    provider = FakeProvider().start()
    yield provider
    provider.stop()


@pytest.fixture
def prices(tmp_path: Path) -> str:
    path = tmp_path / "prices.yaml"
    path.write_text(PRICES_YAML)
    return str(path)


@pytest.mark.redis
def test_settle_is_retried_through_an_outage_and_sent_when_the_service_returns(
    spendgate: Callable[..., SpendgateServer], redis_url: str, prices: str, fake: FakeProvider
) -> None:
    """A settle the service could not take stays queued and is sent once the service is back."""
    port = free_port()
    args = ("--store", "redis", "--redis-url", redis_url, "--config", prices)
    server = spendgate(*args, port=port)
    # The service goes down while the provider is answering: the call itself succeeds.
    fake.on_request = lambda _request: server.stop()
    session = new_session()
    with JournaledAnthropic(
        api_key="k", base_url=fake.base_url, max_retries=0, session_id=session, spendgate_target=server.target
    ) as client:
        message = client.messages.create(
            model="claude-test-big", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        )
        assert message.usage.output_tokens == fake.usage.output_tokens
        assert not client.spendgate_flush(0.3)  # still queued, not dropped
        fake.on_request = None
        spendgate(*args, port=port)  # same Redis: the reservation is still there
        assert client.spendgate_flush(10)
    assert session_spend(server.target, session) == cost(BIG, fake.usage)


def test_close_flushes_the_queue(
    prices: str, fake: FakeProvider, spendgate: Callable[..., SpendgateServer]
) -> None:
    """Closing the client (leaving the with block) sends every queued settle without an explicit flush."""
    server = spendgate("--config", prices)
    fake.usage = Usage(input_tokens=10, output_tokens=20)
    session = new_session()
    with JournaledAnthropic(
        api_key="k", base_url=fake.base_url, session_id=session, spendgate_target=server.target
    ) as client:
        for i in range(5):
            client.messages.create(
                model="claude-test-big", max_tokens=100, messages=[{"role": "user", "content": f"{i}"}]
            )
    assert session_spend(server.target, session) == 5 * cost(BIG, fake.usage)


async def test_async_close_flushes_the_queue(
    prices: str, fake: FakeProvider, spendgate: Callable[..., SpendgateServer]
) -> None:
    """Leaving `async with` sends every queued settle, off the event loop."""
    server = spendgate("--config", prices)
    session = new_session()
    async with AsyncJournaledOpenAI(
        api_key="k", base_url=fake.openai_base_url, session_id=session, spendgate_target=server.target
    ) as client:
        await client.chat.completions.create(
            model="gpt-test-big", messages=[{"role": "user", "content": "hi"}]
        )
    assert session_spend(server.target, session) == cost(BIG, fake.usage)


def test_interpreter_exit_flushes_a_client_never_closed(
    prices: str, fake: FakeProvider, spendgate: Callable[..., SpendgateServer]
) -> None:
    """A program that never closes its client still settles: the atexit hook drains the queue."""
    server = spendgate("--config", prices)
    session = new_session()
    program = textwrap.dedent(
        """
        import os, time
        from spendgate_client import JournaledAnthropic

        client = JournaledAnthropic(
            api_key="k", base_url=os.environ["FAKE"], session_id=os.environ["SESSION"],
            spendgate_target=os.environ["TARGET"],
        )
        gate = client._spendgate_gate
        send = gate.client.settle

        def slow_settle(*args, **kwargs):
            time.sleep(0.2)  # a slow network: the program is exiting while this is in flight
            return send(*args, **kwargs)

        gate.client.settle = slow_settle
        hello = [{"role": "user", "content": "hi"}]
        client.messages.create(model="claude-test-big", max_tokens=100, messages=hello)
        print("queued", gate.settler.pending)
        """
    )
    env = {**os.environ, "FAKE": fake.base_url, "SESSION": session, "TARGET": server.target}
    done = subprocess.run(
        [sys.executable, "-c", program],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=60,
    )
    assert "queued 1" in done.stdout
    assert session_spend(server.target, session) == cost(BIG, fake.usage)


def test_a_settle_for_an_unknown_reservation_is_dropped_not_retried_forever(
    prices: str, spendgate: Callable[..., SpendgateServer], caplog: pytest.LogCaptureFixture
) -> None:
    """The service refusing a settle (unknown reservation) is logged and dropped; the queue still drains."""
    server = spendgate("--config", prices)
    client = JournaledAnthropic(api_key="k", session_id=new_session(), spendgate_target=server.target)
    try:
        client._spendgate_gate.settler.submit(client.spendgate_session_id, "0" * 32, "claude-test-big")
        assert client.spendgate_flush(10)
        assert client._spendgate_gate.settler.dropped == 1
    finally:
        client.close()
    assert any("refused settle" in r.message for r in caplog.records)
