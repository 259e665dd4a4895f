"""The ``spendgate`` command: serve, and decide/settle from the shell."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence

import grpc
from google.protobuf import json_format
from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import decision_pb2_grpc

from spendgate_server.admin.channel import add_connection_arguments, call_metadata, open_channel
from spendgate_server.admin.config_cli import add_config_arguments, run_config_command
from spendgate_server.admin.keys_cli import add_keys_arguments, run_keys_command
from spendgate_server.admin.migrate_cli import add_migrate_arguments, run_migrate_command
from spendgate_server.admin.policy_cli import add_policies_arguments, run_policies_command
from spendgate_server.admin.price_cli import add_price_arguments, run_price_command
from spendgate_server.admin.violations_cli import add_violations_arguments, run_violations_command
from spendgate_server.console import add_console_arguments, run_console_command
from spendgate_server.documents import parse_document
from spendgate_server.errors import ConfigError, InvalidArgument, StoreUnavailable
from spendgate_server.logging import redact_secrets
from spendgate_server.settings import add_serve_arguments, load_config_file, settings_from_args

__all__ = ["main"]

EXIT_BLOCKED = 3  # `spendgate decide` exits with this when the call is blocked


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spendgate", description="Block runaway LLM spend before it happens."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the Decide service")
    add_serve_arguments(serve)

    decide = commands.add_parser("decide", help="ask for one decision")
    add_connection_arguments(decide)
    decide.add_argument("--session", required=True, help="session id")
    decide.add_argument("--model", required=True)
    decide.add_argument("--input-tokens", type=int, default=1000)
    decide.add_argument("--max-output-tokens", type=int, default=1000)
    decide.add_argument("--tool-calls", type=int, default=0, help="tool results in this request")
    decide.add_argument("--prompt", default="", help="request text; the fingerprint is its hash")
    decide.add_argument("--request-id", default="")
    decide.add_argument(
        "--config",
        default="",
        help="client enforcement_config as JSON, e.g. '{\"token_ceiling\": 500}'",
    )
    decide.add_argument("--timeout", type=float, default=2.0, help="deadline in seconds")
    decide.add_argument("--json", action="store_true", help="print the full response as JSON")

    keys = commands.add_parser("keys", help="create, list and revoke API keys")
    add_keys_arguments(keys)

    migrate = commands.add_parser("migrate-keys", help="move Redis records to the current key schema")
    add_migrate_arguments(migrate)

    config = commands.add_parser("config", help="read, change and audit the remote enforcement config")
    add_config_arguments(config)

    console = commands.add_parser("console", help="serve the web console (sign in with an admin key)")
    add_console_arguments(console)

    policies = commands.add_parser("policies", help="read and change the org-wide policies")
    add_policies_arguments(policies)

    violations = commands.add_parser("violations", help="list or follow policy violations (the alerts feed)")
    add_violations_arguments(violations)

    worker = commands.add_parser(
        "worker", help="evaluate journaled calls against the policies (takes the serve flags; redis store)"
    )
    add_serve_arguments(worker)

    price = commands.add_parser(
        "price", help="show how a model name resolves, its rates and what a usage costs (runs locally)"
    )
    add_price_arguments(price)

    settle = commands.add_parser("settle", help="report the real usage of an allowed call")
    add_connection_arguments(settle)
    settle.add_argument("--session", required=True)
    settle.add_argument("--reservation", required=True, help="reservation id from decide")
    settle.add_argument("--model", required=True, help="the model that ran")
    settle.add_argument("--input-tokens", type=int, default=0)
    settle.add_argument("--output-tokens", type=int, default=0)
    settle.add_argument("--provider-error", action="store_true", help="the call failed: release it")
    settle.add_argument("--timeout", type=float, default=2.0)
    return parser


def _client_config(text: str) -> pb.EnforcementConfig | None:
    if not text:
        return None
    from spendgate_server.engine.config import parse_enforcement_config
    from spendgate_server.rpc.wire import config_to_proto

    raw = parse_document(text, "--config", json_only=True)
    try:
        return config_to_proto(parse_enforcement_config(raw, prefix="--config "))
    except InvalidArgument as exc:
        raise ConfigError(str(exc)) from exc


def _fingerprint(args: argparse.Namespace) -> bytes:
    canonical = json.dumps(
        [args.model, args.prompt, args.input_tokens, args.max_output_tokens, args.tool_calls]
    )
    return hashlib.sha256(canonical.encode()).digest()


def _decide(args: argparse.Namespace) -> int:
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
    with open_channel(args) as channel:
        response = decision_pb2_grpc.DecisionServiceStub(channel).Decide(
            request, timeout=args.timeout, metadata=call_metadata(args)
        )
    if args.json:
        print(json_format.MessageToJson(response, preserving_proto_field_name=True))
    else:
        verdict = pb.Verdict.Name(response.verdict).removeprefix("VERDICT_")
        rule = pb.Rule.Name(response.rule).removeprefix("RULE_").lower() if response.rule else "-"
        print(f"{verdict}  rule={rule}  model={response.effective_model}  reason: {response.reason}")
        print(
            f"  decision={response.decision_id}  estimate_nano_usd={response.estimated_cost_nano_usd}"
            f"  session_spend_nano_usd={response.session_spend_nano_usd}"
        )
    return EXIT_BLOCKED if response.verdict == pb.VERDICT_BLOCK else 0


def _settle(args: argparse.Namespace) -> int:
    request = pb.SettleRequest(
        session_id=args.session,
        reservation_id=args.reservation,
        model=args.model,
        usage=pb.Usage(input_tokens=args.input_tokens, output_tokens=args.output_tokens),
        outcome=pb.PROVIDER_OUTCOME_ERROR if args.provider_error else pb.PROVIDER_OUTCOME_OK,
    )
    with open_channel(args) as channel:
        response = decision_pb2_grpc.DecisionServiceStub(channel).Settle(
            request, timeout=args.timeout, metadata=call_metadata(args)
        )
    print(
        json_format.MessageToJson(
            response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    )
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``spendgate`` command."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            from spendgate_server.app import run

            run(settings_from_args(args))
            code = 0
        elif args.command == "decide":
            code = _decide(args)
        elif args.command == "config":
            code = run_config_command(args)
        elif args.command == "keys":
            code = run_keys_command(args)
        elif args.command == "migrate-keys":
            code = run_migrate_command(args)
        elif args.command == "policies":
            code = run_policies_command(args)
        elif args.command == "violations":
            code = run_violations_command(args)
        elif args.command == "worker":
            from spendgate_server.worker import run_worker

            run_worker(settings_from_args(args))
            code = 0
        elif args.command == "console":
            code = run_console_command(args)
        elif args.command == "price":
            code = run_price_command(args, lambda path: load_config_file(path)[1])
        else:
            code = _settle(args)
    except ConfigError as exc:
        print(f"spendgate: {redact_secrets(str(exc))}", file=sys.stderr)
        code = 2
    except StoreUnavailable as exc:
        print(f"spendgate: the store is unreachable: {redact_secrets(str(exc))}", file=sys.stderr)
        code = 1
    except grpc.RpcError as exc:
        print(f"spendgate: {exc.code().name}: {exc.details()}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)
