"""Several settles in one RPC (SettleBatch) or riding along a Decide: each applied once, each answered."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import redis
from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import decision_pb2_grpc
from spendgate_server.store.keyspace import log_stream_key

from tests.conftest import STORES
from tests.integration.test_reliability import poll
from tests.processes import SpendgateServer, server_on_store

CONFIG = """
enforcement:
  max_session_usd: 0.01
prices:
  big: {input_usd_per_mtok: 1, output_usd_per_mtok: 2}
"""
ESTIMATE = 1000 * 1000 + 500 * 2000  # input_tokens=1000, max_output_tokens=500 on "big"
OK, INVALID_ARGUMENT, NOT_FOUND = 0, 3, 5


@pytest.fixture(scope="module", params=STORES)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SpendgateServer]:
    """One server per store for the module: each test decides and settles in sessions of its own."""
    config = tmp_path_factory.mktemp("settle-batch") / "spendgate.yaml"
    config.write_text(CONFIG)
    with server_on_store(request.param, "--config", str(config)) as server:
        yield server


@pytest.fixture
def stub(server: SpendgateServer) -> Iterator[decision_pb2_grpc.DecisionServiceStub]:
    channel = grpc.insecure_channel(server.target)
    yield decision_pb2_grpc.DecisionServiceStub(channel)
    channel.close()


def decide(session: str, prompt: str, **fields: object) -> pb.DecideRequest:
    return pb.DecideRequest(
        session_id=session,
        model="big",
        input_tokens=1000,
        max_output_tokens=500,
        fingerprint=hashlib.sha256(prompt.encode()).digest(),
        **fields,  # type: ignore[arg-type]  # proto fields by name
    )


def settle(session: str, reservation_id: str, input_tokens: int = 10, **fields: object) -> pb.SettleRequest:
    return pb.SettleRequest(
        session_id=session,
        reservation_id=reservation_id,
        model="big",
        usage=pb.Usage(input_tokens=input_tokens),
        outcome=pb.PROVIDER_OUTCOME_OK,
        **fields,  # type: ignore[arg-type]  # proto fields by name
    )


def test_a_batch_answers_each_settle_in_order(stub: decision_pb2_grpc.DecisionServiceStub) -> None:
    """Applied, applied before, unknown and malformed settles of one batch each get their own result."""
    first = stub.Decide(decide("b1", "a")).reservation_id
    second = stub.Decide(decide("b1", "b")).reservation_id
    response = stub.SettleBatch(
        pb.SettleBatchRequest(
            settles=[
                settle("b1", first, input_tokens=100),
                settle("b1", first, input_tokens=100),  # a retry in the same batch counts once
                settle("b1", "0" * 32),
                settle("b1", second, input_tokens=-1),
                settle("b1", second, input_tokens=200),
            ]
        )
    )
    codes = [r.code for r in response.results]
    assert codes == [OK, OK, NOT_FOUND, INVALID_ARGUMENT, OK]
    assert sorted(r.settled.already_settled for r in response.results if r.code == OK) == [False, False, True]
    assert {r.settled.actual_cost_nano_usd for r in response.results if r.code == OK} == {100_000, 200_000}
    assert response.results[3].message.startswith("usage.input_tokens:")
    assert "no reservation" in response.results[2].message
    # Both reservations are settled at their real cost and nothing else is held.
    probe = stub.Decide(decide("b1", "probe"))
    assert probe.session_spend_nano_usd == 300_000 + ESTIMATE  # and the probe's own reservation


@pytest.mark.parametrize("count", [0, 65])
def test_a_batch_holds_one_to_sixty_four_settles(
    stub: decision_pb2_grpc.DecisionServiceStub, count: int
) -> None:
    """An empty batch, or one past 64 settles, is INVALID_ARGUMENT naming `settles`."""
    batch = pb.SettleBatchRequest(settles=[settle("b2", f"{i:032x}") for i in range(count)])
    with pytest.raises(grpc.RpcError) as caught:
        stub.SettleBatch(batch)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "settles: must hold 1-64 settles"


def test_a_decide_applies_the_settles_it_carries_before_deciding(
    stub: decision_pb2_grpc.DecisionServiceStub,
) -> None:
    """Five open reservations fill the budget; a Decide carrying their settles sees them settled."""
    reservations = [stub.Decide(decide("c1", f"call {i}")).reservation_id for i in range(5)]
    blocked = stub.Decide(decide("c1", "blocked"))
    assert (blocked.verdict, blocked.rule) == (pb.VERDICT_BLOCK, pb.RULE_SESSION_BUDGET)

    carrying = stub.Decide(decide("c1", "next", settles=[settle("c1", r) for r in reservations]))
    assert carrying.verdict == pb.VERDICT_ALLOW
    assert [r.code for r in carrying.settle_results] == [OK] * 5
    assert [r.settled.actual_cost_nano_usd for r in carrying.settle_results] == [10_000] * 5
    assert carrying.session_spend_nano_usd == 5 * 10_000 + ESTIMATE


def test_a_bad_carried_settle_fails_only_itself(stub: decision_pb2_grpc.DecisionServiceStub) -> None:
    """A malformed or unknown carried settle gets its error as a result; the decision is made."""
    reservation = stub.Decide(decide("c2", "a")).reservation_id
    response = stub.Decide(
        decide(
            "c2",
            "b",
            settles=[settle("c2", "not-hex"), settle("c2", "f" * 32), settle("c2", reservation)],
        )
    )
    assert response.verdict == pb.VERDICT_ALLOW
    assert [r.code for r in response.settle_results] == [INVALID_ARGUMENT, NOT_FOUND, OK]
    assert response.settle_results[0].message.startswith("reservation_id:")


def test_a_decide_without_settles_answers_no_results(stub: decision_pb2_grpc.DecisionServiceStub) -> None:
    """Nothing carried, nothing answered: the response is what it always was."""
    assert not stub.Decide(decide("c3", "a")).settle_results


def test_a_decide_carrying_too_many_settles_is_refused(stub: decision_pb2_grpc.DecisionServiceStub) -> None:
    """Past 64 carried settles the Decide is INVALID_ARGUMENT naming `settles`, and nothing is reserved."""
    with pytest.raises(grpc.RpcError) as caught:
        stub.Decide(decide("c4", "a", settles=[settle("c4", f"{i:032x}") for i in range(65)]))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert stub.Decide(decide("c4", "b")).session_spend_nano_usd == ESTIMATE


@pytest.mark.redis
def test_settles_in_batches_and_decides_are_journaled_once(
    spendgate: Callable[..., SpendgateServer], redis_url: str, tmp_path: Path
) -> None:
    """However often a settle is sent (batch, carried, alone), its call is journaled once."""
    config = tmp_path / "spendgate.yaml"
    config.write_text(CONFIG)
    server = spendgate("--config", str(config), "--store", "redis", "--redis-url", redis_url)
    with grpc.insecure_channel(server.target) as channel:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)
        reservations = [stub.Decide(decide("j1", f"call {i}")).reservation_id for i in range(3)]
        twice = [settle("j1", r) for r in reservations] * 2
        assert [r.code for r in stub.SettleBatch(pb.SettleBatchRequest(settles=twice)).results] == [OK] * 6
        carried = stub.Decide(decide("j1", "next", settles=[settle("j1", reservations[0])]))
        assert carried.settle_results[0].settled.already_settled
        stub.Settle(settle("j1", reservations[1]))
    client = redis.Redis.from_url(redis_url)
    stream = log_stream_key("journal", "default")
    try:
        # Each call is journaled just after its first Settle is answered (its intent was stored
        # with the settle); a repeated settle adds nothing.
        poll("the journal appends", lambda: client.xlen(stream) >= 3)
        entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(stream)  # type: ignore[assignment]  # sync client
    finally:
        client.close()
    journaled = [entry for _id, entry in entries]
    assert len(journaled) == 3
    assert all(b"j1" in entry[b"p"] for entry in journaled)
