"""Domain → wire for policies and violations (validation.py is the other way)."""

from __future__ import annotations

from google.protobuf import timestamp_pb2
from spendgate.v1 import policy_pb2 as ppb
from spendgate.v1 import violation_pb2 as vpb

from spendgate_server.policy.policies import Policies
from spendgate_server.policy.violations import Violation

__all__ = ["policies_to_proto", "timestamp", "violation_to_proto"]


def timestamp(ms: int) -> timestamp_pb2.Timestamp:
    """A Timestamp of Unix milliseconds."""
    return timestamp_pb2.Timestamp(seconds=ms // 1000, nanos=ms % 1000 * 1_000_000)


def policies_to_proto(policies: Policies) -> ppb.Policies:
    """Wire form of Policies."""
    message = ppb.Policies(
        approved_models=list(policies.approved_models),
        banned_patterns=[ppb.BannedPattern(id=b.id, pattern=b.pattern) for b in policies.banned_patterns],
        key_environment_check=[
            ppb.KeyEnvironmentRule(
                key_fingerprint=r.key_fingerprint, key_label=r.key_label, environments=list(r.environments)
            )
            for r in policies.key_environment_check
        ],
        journal_prompts=policies.journal_prompts,
    )
    if policies.approval_required_threshold_cents is not None:
        message.approval_required_threshold_cents = policies.approval_required_threshold_cents
    return message


def violation_to_proto(v: Violation) -> vpb.Violation:
    """Wire form of a stored Violation."""
    message = vpb.Violation(
        violation_id=v.violation_id,
        policy_type=int(v.policy_type),  # type: ignore[arg-type]  # PolicyType values are the wire codes
        message=v.message,
        cursor=v.cursor,
        create_time=timestamp(v.create_time_ms),
        call_time=timestamp(v.call_time_ms),
        decision_id=v.decision_id,
        session_id=v.session_id,
        project=v.project,
        requested_model=v.requested_model,
        effective_model=v.effective_model,
        environment=v.environment,
        key_fingerprint=v.key_fingerprint,
        key_label=v.key_label,
        cost_nano_usd=v.cost_nano_usd,
        policy_version=v.policy_version,
        approved_models=list(v.approved_models),
        permitted_environments=list(v.permitted_environments),
        threshold_cents=v.threshold_cents,
    )
    if v.anomaly is not None:
        a = v.anomaly
        message.settle_anomaly.CopyFrom(
            vpb.SettleAnomaly(
                kind=int(a.kind),  # type: ignore[arg-type]  # AnomalyKind values are the wire codes
                decided_model=a.decided_model,
                estimated_cost_nano_usd=a.estimate_nano_usd,
                decided_input_tokens=a.decided_input_tokens,
                decided_max_output_tokens=a.decided_max_output_tokens,
                settle_delay_millis=a.settle_delay_ms,
            )
        )
    if v.pattern is not None:
        message.pattern.CopyFrom(
            vpb.PatternViolation(
                pattern_id=v.pattern.pattern_id,
                pattern=v.pattern.pattern,
                offset=v.pattern.offset,
                redacted_excerpt=v.pattern.redacted_excerpt,
                matched_on_client=v.pattern.matched_on_client,
            )
        )
    return message
