"""``spendgate decide`` and ``spendgate settle``: one Decide or Settle from the shell.

Both print one verdict line and one line of figures, or with ``--json`` one JSON object
whose rule names are the config keys (``token_ceiling`` …), as everywhere users see them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from typing import Any

from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import decision_pb2_grpc

from spendgate_server.admin.channel import add_connection_arguments, call_metadata, open_channel
from spendgate_server.admin.flags import count, flag_errors, seconds
from spendgate_server.documents import parse_document, read_document
from spendgate_server.errors import ConfigError, InvalidArgument
from spendgate_server.rule_codes import Rule

__all__ = [
    "DECIDE_FLAGS",
    "EXIT_BLOCKED",
    "SETTLE_FLAGS",
    "add_decide_arguments",
    "add_settle_arguments",
    "decide_json",
    "rule_key",
    "run_decide_command",
    "run_settle_command",
    "settle_json",
]

EXIT_BLOCKED = 3  # `spendgate decide` exits with this when the call is blocked

# Request field → the flag that sets it, so a refusal by the service names the flag to fix.
DECIDE_FLAGS = {
    "session_id": "--session",
    "model": "--model",
    "input_tokens": "--input-tokens",
    "max_output_tokens": "--max-output-tokens",
    "tool_call_count": "--tool-calls",
    "request_id": "--request-id",
    # The wire's names for what --config spells in the user-facing form.
    "enforcement_config.max_session_nano_usd": "--config max_session_usd",
    "enforcement_config.model_downgrade.threshold_nano_usd": "--config model_downgrade.threshold_usd",
    "enforcement_config.model_downgrade.fallback_model": "--config model_downgrade.fallback",
    "enforcement_config.": "--config",
}
SETTLE_FLAGS = {
    "session_id": "--session",
    "reservation_id": "--reservation",
    "model": "--model",
    "usage.input_tokens": "--input-tokens",
    "usage.output_tokens": "--output-tokens",
}


def add_decide_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the flags of ``decide``."""
    add_connection_arguments(parser)
    parser.add_argument("--session", required=True, help="session id")
    parser.add_argument("--model", required=True)
    parser.add_argument("--input-tokens", type=count, default=1000)
    parser.add_argument("--max-output-tokens", type=count, default=1000)
    parser.add_argument("--tool-calls", type=count, default=0, help="tool results in this request")
    parser.add_argument("--prompt", default="", help="request text; the fingerprint is its hash")
    parser.add_argument("--request-id", default="")
    parser.add_argument(
        "--config",
        default="",
        help="client enforcement_config: inline JSON, e.g. '{\"token_ceiling\": 500}', or a YAML or "
        "JSON file (@rules.yaml or rules.yaml; the rule keys, or a mapping with 'enforcement:')",
    )
    parser.add_argument("--timeout", type=seconds, default=2.0, help="deadline in seconds")
    parser.add_argument("--json", action="store_true", help="print the decision as one JSON object")
    parser.set_defaults(field_flags=DECIDE_FLAGS)


def add_settle_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the flags of ``settle``."""
    add_connection_arguments(parser)
    parser.add_argument("--session", required=True)
    parser.add_argument("--reservation", required=True, help="the reservation id decide printed")
    parser.add_argument("--model", required=True, help="the model that ran")
    parser.add_argument("--input-tokens", type=count, default=0)
    parser.add_argument("--output-tokens", type=count, default=0)
    parser.add_argument("--provider-error", action="store_true", help="the call failed: release it")
    parser.add_argument("--timeout", type=seconds, default=2.0, help="deadline in seconds")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.set_defaults(field_flags=SETTLE_FLAGS)


def rule_key(code: int) -> str | None:
    """The config key of a wire Rule value (``token_ceiling`` …); None for none or an unknown value."""
    return Rule(code).key if code in Rule._value2member_map_ else None


def _client_config(text: str) -> pb.EnforcementConfig | None:
    if not text:
        return None
    from spendgate_server.engine.config import parse_enforcement_config
    from spendgate_server.rpc.wire import config_to_proto

    if text.lstrip().startswith(("{", "[")):  # inline JSON; anything else names a file
        raw = parse_document(text, "--config", json_only=True)
    else:
        # A file, read within the bounds every config file is read within.
        raw = read_document(text.removeprefix("@"), "--config")
        if isinstance(raw, dict) and set(raw) == {"enforcement"}:
            raw = raw["enforcement"] or {}
    if not isinstance(raw, dict):
        raise ConfigError(
            "--config must be a JSON object, e.g. '{\"token_ceiling\": 500}', or a file of one mapping"
        )
    try:
        return config_to_proto(parse_enforcement_config(raw, prefix="--config "))
    except InvalidArgument as exc:
        raise ConfigError(str(exc)) from exc


def _fingerprint(args: argparse.Namespace) -> bytes:
    canonical = json.dumps(
        [args.model, args.prompt, args.input_tokens, args.max_output_tokens, args.tool_calls]
    )
    return hashlib.sha256(canonical.encode()).digest()


def decide_json(response: pb.DecideResponse) -> dict[str, Any]:
    """A DecideResponse as the CLI prints it with --json: rules by config key, amounts as integers."""
    return {
        "verdict": pb.Verdict.Name(response.verdict).removeprefix("VERDICT_"),
        "rule": rule_key(response.rule),
        "reason": response.reason,
        "effective_model": response.effective_model,
        "decision_id": response.decision_id,
        "reservation_id": response.reservation_id or None,
        "estimated_cost_nano_usd": response.estimated_cost_nano_usd,
        "session_spend_nano_usd": response.session_spend_nano_usd,
        "settled_spend_nano_usd": response.settled_spend_nano_usd,
        "reserved_nano_usd": response.reserved_nano_usd,
        "remaining_budget_nano_usd": (
            response.remaining_budget_nano_usd if response.HasField("remaining_budget_nano_usd") else None
        ),
        "unblocks_on_settle": response.unblocks_on_settle,
        "would_block": response.would_block,
        "shadow_rules": [rule_key(r) or str(r) for r in response.shadow_rules],
        "config_version": response.config_version,
    }


def settle_json(args: argparse.Namespace, response: pb.SettleResponse) -> dict[str, Any]:
    """A SettleResponse as the CLI prints it with --json, with the reservation it settled."""
    return {
        "outcome": _settle_outcome(args, response),
        "reservation_id": args.reservation,
        "model": args.model,
        "actual_cost_nano_usd": response.actual_cost_nano_usd,
        "session_spend_nano_usd": response.session_spend_nano_usd,
        "already_settled": response.already_settled,
    }


def _settle_outcome(args: argparse.Namespace, response: pb.SettleResponse) -> str:
    if response.already_settled:
        return "ALREADY_SETTLED"
    return "RELEASED" if args.provider_error else "SETTLED"


def run_decide_command(args: argparse.Namespace) -> int:
    """Ask for one decision and print it; returns 0 when the call may go ahead, 3 when blocked."""
    request = pb.DecideRequest(
        session_id=args.session,
        model=args.model,
        input_tokens=args.input_tokens,
        max_output_tokens=args.max_output_tokens,
        fingerprint=_fingerprint(args),
        tool_call_count=args.tool_calls,
        request_id=args.request_id,
    )
    config = _client_config(args.config)
    if config is not None:
        request.enforcement_config.CopyFrom(config)
    from spendgate_server.rpc.validation import call_from_proto

    with open_channel(args) as channel:  # checks the connection flags; connects at the first call
        # The service's own validation, here: a bad id is exit 2 even with no server to ask.
        with flag_errors(DECIDE_FLAGS):
            call_from_proto(request, tenant="")
        response = decision_pb2_grpc.DecisionServiceStub(channel).Decide(
            request, timeout=args.timeout, metadata=call_metadata(args)
        )
    shown = decide_json(response)
    if args.json:
        print(json.dumps(shown))
    else:
        print(
            f"{shown['verdict']}  rule={shown['rule'] or '-'}  model={response.effective_model}"
            f"  reason: {response.reason}"
        )
        reservation = f"  reservation={response.reservation_id}" if response.reservation_id else ""
        print(
            f"  decision={response.decision_id}{reservation}"
            f"  estimate_nano_usd={response.estimated_cost_nano_usd}"
            f"  session_spend_nano_usd={response.session_spend_nano_usd}"
        )
    return EXIT_BLOCKED if response.verdict == pb.VERDICT_BLOCK else 0


def run_settle_command(args: argparse.Namespace) -> int:
    """Report the real usage of an allowed call (or release it) and print the result; returns 0."""
    request = pb.SettleRequest(
        session_id=args.session,
        reservation_id=args.reservation,
        model=args.model,
        usage=pb.Usage(input_tokens=args.input_tokens, output_tokens=args.output_tokens),
        outcome=pb.PROVIDER_OUTCOME_ERROR if args.provider_error else pb.PROVIDER_OUTCOME_OK,
    )
    from spendgate_server.rpc.validation import settle_from_proto

    with open_channel(args) as channel:
        with flag_errors(SETTLE_FLAGS):
            settle_from_proto(request, tenant="")
        response = decision_pb2_grpc.DecisionServiceStub(channel).Settle(
            request, timeout=args.timeout, metadata=call_metadata(args)
        )
    shown = settle_json(args, response)
    if args.json:
        print(json.dumps(shown))
    else:
        print(f"{shown['outcome']}  reservation={args.reservation}  model={args.model}")
        print(
            f"  cost_nano_usd={response.actual_cost_nano_usd}"
            f"  session_spend_nano_usd={response.session_spend_nano_usd}"
        )
    return 0
