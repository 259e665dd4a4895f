"""spendgate client: ask Decide before every LLM provider call, settle after it.

Example::

    from spendgate_client import DecisionClient

    client = DecisionClient("127.0.0.1:50051", fail_mode="open")
    decision = client.decide("my-session", "claude-sonnet-4-5", 2000, 1024, fingerprint)
    decision.raise_for_block()

The drop-in SDK wrappers (``JournaledAnthropic``, ``AsyncJournaledAnthropic``,
``JournaledOpenAI``, ``AsyncJournaledOpenAI``) are imported on first use, so this
package imports without the provider SDKs (the ``anthropic`` / ``openai`` extras).
"""

import importlib
from typing import TYPE_CHECKING, Any

from spendgate_client._client import (
    DEFAULT_MAX_OUTSTANDING,
    DEFAULT_TARGET,
    AsyncDecisionClient,
    ClientStats,
    Decision,
    DecisionClient,
    FailMode,
    JournalContext,
    Settlement,
    Usage,
    settle_refused,
    tls_credentials,
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
from spendgate_client._install import extra_requirement
from spendgate_client._policy import key_fingerprint

if TYPE_CHECKING:
    from spendgate_client._anthropic import AsyncJournaledAnthropic, JournaledAnthropic
    from spendgate_client._openai import AsyncJournaledOpenAI, JournaledOpenAI

# name → (private module, provider SDK it needs, extra that installs it)
_WRAPPERS = {
    "JournaledAnthropic": ("_anthropic", "anthropic"),
    "AsyncJournaledAnthropic": ("_anthropic", "anthropic"),
    "JournaledOpenAI": ("_openai", "openai"),
    "AsyncJournaledOpenAI": ("_openai", "openai"),
}

__all__ = [
    "CONFIG_KEYS",
    "DEFAULT_MAX_OUTSTANDING",
    "DEFAULT_TARGET",
    "AsyncDecisionClient",
    "AsyncJournaledAnthropic",
    "AsyncJournaledOpenAI",
    "ClientStats",
    "Decision",
    "DecisionClient",
    "DuplicateRequest",
    "EnforcementError",
    "FailMode",
    "InvalidRequest",
    "JournalContext",
    "JournaledAnthropic",
    "JournaledOpenAI",
    "SessionBudgetExceeded",
    "Settlement",
    "SpendgateError",
    "SpendgateUnavailable",
    "TokenCeilingExceeded",
    "ToolCallLimitExceeded",
    "Usage",
    "enforcement_config_to_proto",
    "key_fingerprint",
    "settle_refused",
    "tls_credentials",
]


def __getattr__(name: str) -> Any:
    """Import a wrapper, and with it its provider SDK, on first use (PEP 562)."""
    if name not in _WRAPPERS:
        raise AttributeError(f"module 'spendgate_client' has no attribute {name!r}")
    module, sdk = _WRAPPERS[name]
    try:
        loaded = importlib.import_module(f"spendgate_client.{module}")
    except ImportError as exc:
        if exc.name != sdk:
            raise
        raise ImportError(
            f"spendgate_client.{name} needs the {sdk} SDK (the client's {sdk!r} extra): "
            f"pip install '{extra_requirement(sdk)}'"
        ) from exc
    value = getattr(loaded, name)
    globals()[name] = value
    return value
