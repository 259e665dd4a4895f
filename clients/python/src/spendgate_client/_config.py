"""The user-facing ``enforcement_config`` dict, checked at construction and turned into proto."""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any

from spendgate.v1 import decision_pb2 as pb

__all__ = ["CONFIG_KEYS", "INT_BOUNDS", "MAX_USD_NANO", "enforcement_config_to_proto"]

NANO_PER_USD = 1_000_000_000
_INT_KEYS = ("token_ceiling", "dedup_ttl_seconds", "max_tool_calls")
_RULES = {
    "token_ceiling": pb.RULE_TOKEN_CEILING,
    "max_session_usd": pb.RULE_SESSION_BUDGET,
    "dedup_ttl_seconds": pb.RULE_DUPLICATE_REQUEST,
    "max_tool_calls": pb.RULE_TOOL_CALL_LIMIT,
    "model_downgrade": pb.RULE_MODEL_DOWNGRADE,
}
CONFIG_KEYS = (*_RULES, "budget_mode", "shadow")

# The server's bounds of each field, inclusive (its rule units, engine/rules/): a config the
# server would refuse is refused here, when the client is made, instead of on every call.
# The client is installed alone, so it keeps this copy; a test compares it with the server's.
INT_BOUNDS = {
    "token_ceiling": (1, 10_000_000),
    "dedup_ttl_seconds": (1, 7 * 24 * 3600),
    "max_tool_calls": (0, 1_000_000),
}
MAX_USD_NANO = 1_000_000 * NANO_PER_USD  # max_session_usd and model_downgrade.threshold_usd
# A model name the server accepts (its validation of model fields).
_MODEL_NAME = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def _usd_to_nano(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ValueError(
            f"enforcement_config[{key!r}] must be a number of US dollars, got {type(value).__name__}"
        )
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(
            f"enforcement_config[{key!r}] must be a number of US dollars, got {value!r}"
        ) from None
    # Bounded before arithmetic: 1e999999 would overflow the decimal context.
    limit = MAX_USD_NANO // NANO_PER_USD
    if not amount.is_finite() or amount < 0 or amount > limit:
        raise ValueError(
            f"enforcement_config[{key!r}] must be a number of US dollars from 0 to {limit}, "
            f"got {str(value)[:32]}"
        )
    # Rounded up to whole nano-USD, as the server rounds a cap it reads from a file.
    return int((amount * NANO_PER_USD).to_integral_value(rounding=ROUND_CEILING))


def enforcement_config_to_proto(config: Mapping[str, Any]) -> pb.EnforcementConfig:
    """Check the keys and types of ``config`` and build the wire message.

    Raises:
        ValueError: naming the unknown key, or the key with a wrong type or a value out of
            the server's bounds (:data:`INT_BOUNDS`, :data:`MAX_USD_NANO`, a model name):
            exactly the configs the server would refuse with INVALID_ARGUMENT.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"enforcement_config must be a dict, got {type(config).__name__}")
    message = pb.EnforcementConfig()
    for key, value in config.items():
        if key not in CONFIG_KEYS:
            raise ValueError(
                f"enforcement_config has unknown key {key!r}; accepted keys: {', '.join(CONFIG_KEYS)}"
            )
        if value is None:
            continue
        if key in _INT_KEYS:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"enforcement_config[{key!r}] must be an int, got {type(value).__name__}")
            low, high = INT_BOUNDS[key]
            if not low <= value <= high:
                raise ValueError(f"enforcement_config[{key!r}] must be from {low} to {high}, got {value}")
            setattr(message, key, value)
        elif key == "max_session_usd":
            message.max_session_nano_usd = _usd_to_nano(key, value)
        elif key == "budget_mode":
            modes = {"crossing": pb.BUDGET_MODE_CROSSING, "strict": pb.BUDGET_MODE_STRICT}
            if value not in modes:
                raise ValueError(
                    f"enforcement_config['budget_mode'] must be 'crossing' or 'strict', got {value!r}"
                )
            message.budget_mode = modes[value]
        elif key == "model_downgrade":
            if not isinstance(value, Mapping) or set(value) != {"threshold_usd", "fallback"}:
                raise ValueError(
                    "enforcement_config['model_downgrade'] must be a dict with exactly "
                    "'threshold_usd' and 'fallback'"
                )
            fallback = value["fallback"]
            if not isinstance(fallback, str) or not _MODEL_NAME.fullmatch(fallback):
                raise ValueError(
                    "enforcement_config['model_downgrade']['fallback'] must be a model name: "
                    f"1-128 characters of [A-Za-z0-9._:@/+=-], got {str(fallback)[:32]!r}"
                )
            message.model_downgrade.threshold_nano_usd = _usd_to_nano(
                "model_downgrade.threshold_usd", value["threshold_usd"]
            )
            message.model_downgrade.fallback_model = value["fallback"]
        elif value is True:
            message.shadow = True
        elif isinstance(value, list | tuple) and all(rule in _RULES for rule in value):
            # Each rule once: the server refuses a list longer than its rules.
            message.shadow_rules.extend(dict.fromkeys(_RULES[rule] for rule in value))
        elif value is not False:
            raise ValueError(
                f"enforcement_config['shadow'] must be true, false or a list of: {', '.join(_RULES)}"
            )
    return message
