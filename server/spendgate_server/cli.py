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
import importlib
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, NoReturn, TypeGuard

# Only what every run needs is imported here: `spendgate --version` and `--help` must not pay
# for the server stack (grpc, the stubs, the price catalogue: about a second). Each command's
# module is imported when that command runs.
from spendgate_server.admin.flags import EXIT_BAD_INPUT, EXIT_FAILED
from spendgate_server.errors import ConfigError, InvalidArgument, StoreUnavailable

if TYPE_CHECKING:
    import grpc

__all__ = ["main"]

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_INTERNAL = 70  # EX_SOFTWARE: an error nobody raised on purpose, a bug

# Each command: its help line, and the module and function that declare its flags. Only the
# command being run has its module imported (see the note on imports above).
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("run the Decide service", "spendgate_server.settings", "add_serve_arguments"),
    "decide": ("ask for one decision", "spendgate_server.admin.decision_cli", "add_decide_arguments"),
    "keys": ("create, list and revoke API keys", "spendgate_server.admin.keys_cli", "add_keys_arguments"),
    "migrate-keys": (
        "move Redis records to the current key schema",
        "spendgate_server.admin.migrate_cli",
        "add_migrate_arguments",
    ),
    "config": (
        "read, change and audit the remote enforcement config",
        "spendgate_server.admin.config_cli",
        "add_config_arguments",
    ),
    "console": (
        "serve the web console (sign in with an admin key)",
        "spendgate_server.console",
        "add_console_arguments",
    ),
    "policies": (
        "read and change the org-wide policies",
        "spendgate_server.admin.policy_cli",
        "add_policies_arguments",
    ),
    "violations": (
        "list or follow policy violations (the alerts feed)",
        "spendgate_server.admin.violations_cli",
        "add_violations_arguments",
    ),
    "worker": (
        "evaluate journaled calls against the policies (redis store)",
        "spendgate_server.settings",
        "add_worker_arguments",
    ),
    "price": (
        "show how a model name resolves, its rates and what a usage costs (runs locally)",
        "spendgate_server.admin.price_cli",
        "add_price_arguments",
    ),
    "settle": (
        "report the real usage of an allowed call",
        "spendgate_server.admin.decision_cli",
        "add_settle_arguments",
    ),
}


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


def _parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The command line parser; only the command named in ``argv`` has its flags declared."""
    parser = _Parser(prog="spendgate", description="Block runaway LLM spend before it happens.")
    parser.add_argument("--version", action="version", version=f"spendgate {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    # The command is the first word that is not an option (the top level takes no option values).
    named = next((word for word in argv if not word.startswith("-")), None)
    for name, (text, module, declare) in _COMMANDS.items():
        command = commands.add_parser(name, help=text)
        if name == named:
            getattr(importlib.import_module(module), declare)(command)
    return parser


def _one_line(text: str) -> str:
    """``text`` on one line: a message from a library may span several."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _fail(code: int, message: str) -> int:
    # Every failure is printed here: a URL's credentials never reach the terminal.
    from spendgate_server.logging import redact_secrets

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
    words = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(words)
    args = parser.parse_args(words)
    _check_text(parser, args)
    try:
        code = _run(args)
    except (ConfigError, InvalidArgument) as exc:
        code = _fail(EXIT_BAD_INPUT, str(exc))
    except StoreUnavailable as exc:
        code = _fail(EXIT_FAILED, f"the store is unreachable: {exc}")
    except KeyboardInterrupt:
        # Ctrl-C ends any command at once, a call in flight included (grpc checks for signals
        # while it waits); the line says why it stopped, as every other failure does.
        code = _fail(EXIT_INTERRUPTED, "interrupted")
    except BrokenPipeError:
        # The reader went away (`spendgate violations list | head`): stop quietly, and keep
        # the interpreter from reporting the failed flush of stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 128 + 13  # SIGPIPE, as shells report it
    except Exception as exc:
        if _is_rpc_error(exc):
            from spendgate_server.admin.channel import explain_rpc_error

            code = _fail(*explain_rpc_error(exc, args, getattr(args, "field_flags", None)))
        # Servers keep their traceback for the logs; the client commands never show one.
        elif args.command in ("serve", "worker") or os.environ.get("SPENDGATE_DEBUG"):
            raise
        else:
            code = _fail(
                EXIT_INTERNAL,
                f"internal error, a bug (SPENDGATE_DEBUG=1 shows the traceback): {type(exc).__name__}: {exc}",
            )
    raise SystemExit(code)


def _is_rpc_error(exc: Exception) -> TypeGuard[grpc.RpcError]:
    """Whether ``exc`` is a failed gRPC call; without grpc imported, nothing can be one."""
    module = sys.modules.get("grpc")
    return module is not None and isinstance(exc, module.RpcError)


def _run(args: argparse.Namespace) -> int:
    """Run the parsed command; its exit code. Each branch imports what its command needs."""
    command: str = args.command
    if command in ("serve", "worker"):
        from spendgate_server.settings import settings_from_args

        settings = settings_from_args(args)
        if command == "serve":
            from spendgate_server.app import run

            return run(settings)
        from spendgate_server.worker import run_worker

        return run_worker(settings)
    if command == "keys":
        from spendgate_server.admin.keys_cli import run_keys_command
        from spendgate_server.stores import open_keystore

        return run_keys_command(args, open_keystore)
    if command == "migrate-keys":
        from spendgate_server.admin.migrate_cli import run_migrate_command
        from spendgate_server.stores import open_redis

        return run_migrate_command(args, open_redis)
    if command == "price":
        from spendgate_server.admin.price_cli import run_price_command
        from spendgate_server.settings import load_config_file

        return run_price_command(args, lambda path: load_config_file(path)[1])
    runners: dict[str, tuple[str, str]] = {
        "decide": ("spendgate_server.admin.decision_cli", "run_decide_command"),
        "settle": ("spendgate_server.admin.decision_cli", "run_settle_command"),
        "config": ("spendgate_server.admin.config_cli", "run_config_command"),
        "policies": ("spendgate_server.admin.policy_cli", "run_policies_command"),
        "violations": ("spendgate_server.admin.violations_cli", "run_violations_command"),
        "console": ("spendgate_server.console", "run_console_command"),
    }
    module, function = runners[command]
    runner: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module), function)
    return runner(args)
