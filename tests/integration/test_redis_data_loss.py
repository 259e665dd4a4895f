"""A Redis that loses its data under a running `spendgate serve --store redis` (issue found by a
user: `shutdown nosave`, restart empty): violations keep being flagged without a server restart.

Real processes: a private redis-server emptied by FLUSHALL (what a restart without
persistence leaves), the server with its evaluator child, calls through DecisionClient.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis
from spendgate_server.policy.journal import EVALUATOR_GROUP, JOURNAL_LOG
from spendgate_server.store.keyspace import log_registry_key
from spendgate_server.store.redis_logs import RedisLogStore

from tests.integration.test_alerts_service import call, list_violations, set_policies, wait_for
from tests.integration.test_evaluator_child import TENANT, redis_server_args
from tests.processes import SpendgateServer

PATTERN = {"id": "k", "pattern": "sk-live-"}


@pytest.mark.redis
def test_violations_are_flagged_after_redis_lost_its_data(
    spendgate: Callable[..., SpendgateServer], redis_url: str
) -> None:
    """The reported sequence: flagged before, FLUSHALL, policies set again, 10 calls of which 7
    violate: exactly those 7 are flagged by the same server, and the registry and group are back."""
    server = spendgate(*redis_server_args(redis_url))
    set_policies(server.target, banned_patterns=[PATTERN], journal_prompts=True)
    call(server.target, "before", model="claude-sonnet-4-5", prompt_text="key sk-live-0 here")
    wait_for(server.target, 1, session_id="before")
    with redis.Redis.from_url(redis_url) as client:
        client.flushall()
    set_policies(server.target, banned_patterns=[PATTERN], journal_prompts=True)
    violating = {
        call(server.target, "after", model="claude-sonnet-4-5", prompt_text=f"key sk-live-{i} here")
        for i in range(7)
    }
    for i in range(3):
        call(server.target, "after", model="claude-sonnet-4-5", prompt_text=f"clean prompt {i}")
    found = wait_for(server.target, 7, session_id="after")
    assert {v.decision_id for v in found} == violating
    assert list_violations(server.target, session_id="before") == []  # lost with the data
    stream = RedisLogStore.from_url(redis_url).stream_key(JOURNAL_LOG, TENANT)
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        assert client.smembers(log_registry_key(JOURNAL_LOG)) == {TENANT}
        assert client.xlen(stream) == 10
        [group] = client.xinfo_groups(stream)
        assert group["name"] == EVALUATOR_GROUP
