"""spendgate client: ask Decide before every LLM provider call, settle after it.

Example::

    from spendgate_client import DecisionClient

    client = DecisionClient("127.0.0.1:50051", fail_mode="open")
    decision = client.decide("my-session", "claude-sonnet-4-5", 2000, 1024, fingerprint)
    decision.raise_for_block()
"""

from spendgate_client._client import (
    DEFAULT_TARGET,
    AsyncDecisionClient,
    ClientStats,
    Decision,
    DecisionClient,
    FailMode,
    Settlement,
)
from spendgate_client._config import CONFIG_KEYS, enforcement_config_to_proto
from spendgate_client._errors import (
    DuplicateRequest,
    EnforcementError,
    InvalidRequest,
    SessionBudgetExceeded,
    SpendgateError,
    SpendgateUnavailable,
    TokenCeilingExceeded,
    ToolCallLimitExceeded,
)

__all__ = [
    "CONFIG_KEYS",
    "DEFAULT_TARGET",
    "AsyncDecisionClient",
    "ClientStats",
    "Decision",
    "DecisionClient",
    "DuplicateRequest",
    "EnforcementError",
    "FailMode",
    "InvalidRequest",
    "SessionBudgetExceeded",
    "Settlement",
    "SpendgateError",
    "SpendgateUnavailable",
    "TokenCeilingExceeded",
    "ToolCallLimitExceeded",
    "enforcement_config_to_proto",
]
