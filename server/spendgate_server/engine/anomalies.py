"""Settle anomalies: a settle that does not match what Decide admitted is counted, and flagged.

The service trusts the client's Settle for what it counts (it cannot see the provider's
bill), so a client could settle its way out of a budget: decide on an expensive model
and report a cheap one, report an error or no tokens for a call that ran, or report far
more than it declared. Every settle is still counted as reported; these checks compare
it with the reservation's record (store.DecidedCall) and say what looks wrong, so the
tenant sees it on the alerts feed (``settle_anomaly`` violations) and the operator in
``spendgate_settle_anomalies_total``. They are pure functions: no I/O, no clock.

Why these thresholds (AnomalyThresholds):

- The estimate is the call's worst case (every input token uncached, every output token
  used), but a 1-hour cache write bills input at 2x, so a cost up to about twice the
  estimate is honest; above ``above_cost_percent`` (250 %) it is not.
- The client's input estimate errs by about -15 %/+35 % on text (README), so more than
  ``above_input_factor`` (2x) the decided input, plus ``above_input_slack_tokens``, is
  under-declared at Decide.
- Images are estimated at the providers' largest size, and a small one can bill ~20x
  less, so "far below" is under a ``below_input_divisor``-th (1/20) of the decided input,
  or no tokens at all for a call that reports success.
- A provider refuses a call (4xx/429/5xx) within seconds, retries included; an error
  reported ``late_error_ms`` (30 s) after the decision is more likely a call that ran.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from spendgate_server.engine.pricing import Usage
from spendgate_server.money import format_usd
from spendgate_server.store.base import DecidedCall

__all__ = ["AnomalyKind", "AnomalyThresholds", "SettleAnomaly", "settle_anomalies"]


class AnomalyKind(enum.IntEnum):
    """Values are the wire codes of spendgate.v1.SettleAnomalyKind."""

    MODEL_MISMATCH = 1
    USAGE_ABOVE_ESTIMATE = 2
    USAGE_BELOW_ESTIMATE = 3
    LATE_ERROR = 4

    @property
    def key(self) -> str:
        """The name in metrics labels and the feed (``model_mismatch``...)."""
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class AnomalyThresholds:
    """Where a settle stops looking honest (see the module docstring for the reasons)."""

    above_cost_percent: int = 250
    above_input_factor: int = 2
    above_input_slack_tokens: int = 1000
    below_input_divisor: int = 20
    # Below this many decided input tokens, "far below" is not judged (estimates of tiny prompts are coarse).
    below_min_decided_input_tokens: int = 200
    late_error_ms: int = 30_000


@dataclass(frozen=True, slots=True)
class SettleAnomaly:
    """One way a settle differs from its decision, with the facts an admin needs."""

    kind: AnomalyKind
    message: str
    decided_model: str
    estimate_nano_usd: int
    decided_input_tokens: int
    decided_max_output_tokens: int
    # From the decision to this settle.
    settle_delay_ms: int


def settle_anomalies(
    decided: DecidedCall,
    *,
    model: str,
    same_model: bool,
    usage: Usage,
    provider_ok: bool,
    cost_nano_usd: int,
    settle_delay_ms: int,
    thresholds: AnomalyThresholds,
) -> tuple[SettleAnomaly, ...]:
    """Every way this settle differs from what Decide admitted.

    Args:
        decided: the reservation's record.
        model: the model the settle reports.
        same_model: whether ``model`` resolves to the decided model (the caller compares
            them through the price table, so aliases and dated ids are the same model).
        usage: the usage the settle reports.
        provider_ok: False when the settle reports a provider error (nothing counted).
        cost_nano_usd: what is counted for this settle.
        settle_delay_ms: time from the decision to this settle.
        thresholds: where a settle stops looking honest.
    """
    t = thresholds
    found: list[tuple[AnomalyKind, str]] = []
    counted = f"counted as reported: {format_usd(cost_nano_usd)}"
    if not same_model:
        found.append(
            (
                AnomalyKind.MODEL_MISMATCH,
                f"settled as {model} but decided on {decided.model} (estimate "
                f"{format_usd(decided.estimate_nano_usd)}); {counted}",
            )
        )
    if provider_ok:
        prompt = usage.prompt_tokens
        cost_ceiling = decided.estimate_nano_usd * t.above_cost_percent // 100
        input_ceiling = decided.input_tokens * t.above_input_factor + t.above_input_slack_tokens
        if cost_nano_usd > cost_ceiling or prompt > input_ceiling:
            found.append(
                (
                    AnomalyKind.USAGE_ABOVE_ESTIMATE,
                    f"reported {prompt} input and {usage.output_tokens} output tokens costing "
                    f"{format_usd(cost_nano_usd)}, far above the {decided.input_tokens} input tokens "
                    f"decided (estimate {format_usd(decided.estimate_nano_usd)}); {counted}",
                )
            )
        nothing = prompt == 0 and usage.output_tokens == 0 and decided.input_tokens > 0
        if nothing or (
            decided.input_tokens >= t.below_min_decided_input_tokens
            and prompt * t.below_input_divisor < decided.input_tokens
        ):
            found.append(
                (
                    AnomalyKind.USAGE_BELOW_ESTIMATE,
                    f"reported {prompt} input and {usage.output_tokens} output tokens, far below the "
                    f"{decided.input_tokens} input tokens decided (estimate "
                    f"{format_usd(decided.estimate_nano_usd)}); {counted}",
                )
            )
    elif settle_delay_ms >= t.late_error_ms:
        found.append(
            (
                AnomalyKind.LATE_ERROR,
                f"reported a provider error {settle_delay_ms / 1000:.0f} s after the decision, so the "
                f"reservation ({format_usd(decided.estimate_nano_usd)} on {decided.model}) was released "
                "and nothing was counted; a refused call fails within seconds",
            )
        )
    return tuple(
        SettleAnomaly(
            kind,
            message,
            decided.model,
            decided.estimate_nano_usd,
            decided.input_tokens,
            decided.max_output_tokens,
            settle_delay_ms,
        )
        for kind, message in found
    )
