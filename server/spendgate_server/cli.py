"""The ``spendgate`` command: every subcommand, and where a failure becomes one line and an exit code."""

from __future__ import annotations

import os
import sys

# The client commands report every failure in one line of their own: grpc's C core must not
# add its log lines to stderr. It reads the variable once, when grpc is imported; serve and
# worker keep grpc's default, and a GRPC_VERBOSITY the user set always wins.
if sys.argv[1:2] not in (["serve"], ["worker"]):
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import argparse
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NoReturn

import grpc

from spendgate_server.admin.channel import EXIT_BAD_INPUT, EXIT_FAILED, explain_rpc_error
from spendgate_server.admin.config_cli import add_config_arguments, run_config_command
from spendgate_server.admin.decision_cli import (
    add_decide_arguments,
    add_settle_arguments,
    run_decide_command,
    run_settle_command,
)
from spendgate_server.admin.keys_cli import add_keys_arguments, run_keys_command
from spendgate_server.admin.migrate_cli import add_migrate_arguments, run_migrate_command
from spendgate_server.admin.policy_cli import add_policies_arguments, run_policies_command
from spendgate_server.admin.price_cli import add_price_arguments, run_price_command
from spendgate_server.admin.violations_cli import add_violations_arguments, run_violations_command
from spendgate_server.console import add_console_arguments, run_console_command
from spendgate_server.errors import ConfigError, InvalidArgument, StoreUnavailable
from spendgate_server.logging import redact_secrets
from spendgate_server.settings import (
    add_serve_arguments,
    add_worker_arguments,
    load_config_file,
    settings_from_args,
)

__all__ = ["main"]

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_INTERNAL = 70  # EX_SOFTWARE: an error nobody raised on purpose, a bug


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where to read more, never the whole usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {_one_line(message)} (see '{self.prog} --help')\n")

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        # argparse drops a value of "--" (its end-of-options marker), which left a list
        # where a flag's text belongs (`--project=--`): refuse it as the bad value it is.
        if action.option_strings and action.nargs is None and arg_strings == ["--"]:
            self.error(f"argument {'/'.join(action.option_strings)}: '--' is not a value")
        return super()._get_values(action, arg_strings)


def _version() -> str:
    try:
        return version("spendgate")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spendgate", description="Block runaway LLM spend before it happens.")
    parser.add_argument("--version", action="version", version=f"spendgate {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the Decide service")
    add_serve_arguments(serve)

    decide = commands.add_parser("decide", help="ask for one decision")
    add_decide_arguments(decide)

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

    worker = commands.add_parser("worker", help="evaluate journaled calls against the policies (redis store)")
    add_worker_arguments(worker)

    price = commands.add_parser(
        "price", help="show how a model name resolves, its rates and what a usage costs (runs locally)"
    )
    add_price_arguments(price)

    settle = commands.add_parser("settle", help="report the real usage of an allowed call")
    add_settle_arguments(settle)
    return parser


def _one_line(text: str) -> str:
    """``text`` on one line: a message from a library may span several."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _fail(code: int, message: str) -> int:
    # Every failure is printed here: a URL's credentials never reach the terminal.
    print(f"spendgate: {_one_line(redact_secrets(message))}", file=sys.stderr)
    return code


def _check_text(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a flag value that is not valid UTF-8 (the shell passed bytes no request can carry)."""
    for dest, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and not v.isascii() and _has_surrogates(v) for v in values):
            parser.error(f"argument --{dest.replace('_', '-')}: is not valid UTF-8 text")


def _has_surrogates(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``spendgate`` command; a failure is one line on stderr, never a traceback.

    Exit codes: 0 done (``decide``: the call may go ahead); 1 the service or the store could
    not be reached, or refused or failed the call; 2 a bad flag, value or file, whether the
    CLI or the service found it; 3 ``decide``: the call is blocked; 70 an internal error (a
    bug: ``SPENDGATE_DEBUG=1`` shows its traceback); 130 interrupted.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    _check_text(parser, args)
    try:
        if args.command == "serve":
            from spendgate_server.app import run

            code = run(settings_from_args(args))
        elif args.command == "decide":
            code = run_decide_command(args)
        elif args.command == "config":
            code = run_config_command(args)
        elif args.command == "keys":
            from spendgate_server.stores import open_keystore

            code = run_keys_command(args, open_keystore)
        elif args.command == "migrate-keys":
            from spendgate_server.stores import open_redis

            code = run_migrate_command(args, open_redis)
        elif args.command == "policies":
            code = run_policies_command(args)
        elif args.command == "violations":
            code = run_violations_command(args)
        elif args.command == "worker":
            from spendgate_server.worker import run_worker

            code = run_worker(settings_from_args(args))
        elif args.command == "console":
            code = run_console_command(args)
        elif args.command == "price":
            code = run_price_command(args, lambda path: load_config_file(path)[1])
        else:
            code = run_settle_command(args)
    except (ConfigError, InvalidArgument) as exc:
        code = _fail(EXIT_BAD_INPUT, str(exc))
    except StoreUnavailable as exc:
        code = _fail(EXIT_FAILED, f"the store is unreachable: {exc}")
    except grpc.RpcError as exc:
        code = _fail(*explain_rpc_error(exc, args, getattr(args, "field_flags", None)))
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`spendgate violations list | head`): stop quietly, and keep
        # the interpreter from reporting the failed flush of stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 128 + 13  # SIGPIPE, as shells report it
    except Exception as exc:
        # Servers keep their traceback for the logs; the client commands never show one.
        if args.command in ("serve", "worker") or os.environ.get("SPENDGATE_DEBUG"):
            raise
        code = _fail(
            EXIT_INTERNAL,
            f"internal error, a bug (SPENDGATE_DEBUG=1 shows the traceback): {type(exc).__name__}: {exc}",
        )
    raise SystemExit(code)
