"""model_downgrade: run an expensive call on a cheaper fallback model. Stateless."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from spendgate_server.engine.rules._unit import (
    MAX_USD_NANO,
    Bad,
    DocRow,
    Draft,
    Effect,
    FormInput,
    Shadowed,
    StatelessRule,
    WireChecker,
    parse_usd,
    pick_stricter,
    usage_estimate,
    usd_text,
)
from spendgate_server.money import format_usd
from spendgate_server.rule_codes import Rule

__all__ = ["ModelDowngrade", "ModelDowngradeRule"]


@dataclass(frozen=True, slots=True)
class ModelDowngrade:
    """Run a call on ``fallback_model`` when its estimate on the requested model exceeds the threshold."""

    threshold_nano_usd: int
    fallback_model: str


def _lower_threshold(mine: ModelDowngrade, theirs: ModelDowngrade) -> ModelDowngrade:
    # On a tie the first (server-side) downgrade keeps its fallback.
    return theirs if theirs.threshold_nano_usd < mine.threshold_nano_usd else mine


class _Fields(Shadowed, Protocol):
    """The config fields this rule reads (EnforcementConfig has them)."""

    @property
    def model_downgrade(self) -> ModelDowngrade | None: ...


class ModelDowngradeRule(StatelessRule):
    """Above the threshold the call runs on the fallback and is priced there; the lower threshold wins."""

    rule = Rule.MODEL_DOWNGRADE
    effect = Effect.DOWNGRADE
    title = "Model downgrade"
    summary = "Run a call on a cheaper model when its estimated cost exceeds the threshold."
    form_inputs = (
        FormInput(
            "model_downgrade.threshold_usd",
            "Threshold per call, US dollars",
            "Both blank turns the rule off.",
            inputmode="decimal",
            kind="text",
        ),
        FormInput(
            "model_downgrade.fallback",
            "Fallback model",
            "A model with a known price, e.g. claude-haiku-4-5-20251001.",
            inputmode="text",
            kind="text",
        ),
    )
    form_all_or_none = "give both the threshold and the fallback model, or neither"
    wire_fields = (
        ("model_downgrade", "model_downgrade.threshold_usd"),
        ("model_downgrade.threshold_nano_usd", "model_downgrade.threshold_usd"),
        ("model_downgrade.fallback_model", "model_downgrade.fallback"),
    )
    docs = (
        DocRow(
            "`model_downgrade` `{threshold_usd, fallback}`",
            "when the estimate on the requested model exceeds the threshold, run on the fallback "
            "(priced there)",
            "none",
            "lower threshold wins (on a tie, the server's fallback)",
        ),
    )

    def enabled(self, config: _Fields) -> bool:
        return config.model_downgrade is not None

    def parse(self, raw: Mapping[str, Any], bad: Bad) -> dict[str, Any]:
        spec = raw.get("model_downgrade")
        if spec is None:
            return {"model_downgrade": None}
        if not isinstance(spec, Mapping) or set(spec) != {"threshold_usd", "fallback"}:
            bad("model_downgrade", "must be a mapping with exactly 'threshold_usd' and 'fallback'")
            return {"model_downgrade": None}
        threshold = parse_usd("model_downgrade.threshold_usd", spec["threshold_usd"], bad)
        fallback = spec["fallback"]
        if not isinstance(fallback, str) or not fallback:
            bad("model_downgrade.fallback", "must be a model name")
            return {"model_downgrade": None}
        return {"model_downgrade": None if threshold is None else ModelDowngrade(threshold, fallback)}

    def to_dict(self, config: _Fields) -> dict[str, Any]:
        downgrade = config.model_downgrade
        if downgrade is None:
            return {}
        return {
            "model_downgrade": {
                "threshold_usd": usd_text(downgrade.threshold_nano_usd),
                "fallback": downgrade.fallback_model,
            }
        }

    def merge(self, mine: _Fields, theirs: _Fields, shadow: set[Rule]) -> dict[str, Any]:
        return pick_stricter(self.rule, mine, theirs, "model_downgrade", _lower_threshold, shadow)

    def from_wire(self, message: Any, check: WireChecker, prefix: str) -> dict[str, Any]:
        if not message.HasField("model_downgrade"):
            return {"model_downgrade": None}
        d = message.model_downgrade
        check.integer(prefix + "model_downgrade.threshold_nano_usd", d.threshold_nano_usd, 0, MAX_USD_NANO)
        check.model_name(prefix + "model_downgrade.fallback_model", d.fallback_model)
        return {"model_downgrade": ModelDowngrade(d.threshold_nano_usd, d.fallback_model)}

    def to_wire(self, config: _Fields) -> dict[str, Any]:
        downgrade = config.model_downgrade
        if downgrade is None:
            return {}
        return {
            "model_downgrade": {
                "threshold_nano_usd": downgrade.threshold_nano_usd,
                "fallback_model": downgrade.fallback_model,
            }
        }

    def check(self, config: _Fields, draft: Draft) -> str | None:
        downgrade = config.model_downgrade
        if downgrade is None or draft.estimate_nano_usd <= downgrade.threshold_nano_usd:
            return None
        return (
            f"estimated {format_usd(draft.estimate_nano_usd)} on {draft.model} exceeds the model_downgrade "
            f"threshold {format_usd(downgrade.threshold_nano_usd)}; running on {downgrade.fallback_model}"
        )

    def apply(self, config: _Fields, draft: Draft) -> None:
        assert config.model_downgrade is not None
        fallback = config.model_downgrade.fallback_model
        # Looked up only when enforced: a shadowed downgrade never needs the fallback's price.
        pricing = draft.prices.lookup(fallback, "model_downgrade.fallback")
        draft.model = fallback
        if draft.max_usage is None:
            draft.estimate_nano_usd = pricing.estimate(draft.input_tokens, draft.max_output_tokens)
        else:
            draft.estimate_nano_usd = usage_estimate(draft.prices, fallback, draft.max_usage)
