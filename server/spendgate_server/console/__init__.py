"""``spendgate console``: the web console: rules, policies, the live violations feed and top sessions.

A small Starlette application that talks to the spendgate services as the signed-in admin
and keeps nothing of its own but the signed-in sessions. Importing this package does not
import the web stack; ``run`` does.
"""

from __future__ import annotations

import argparse

from spendgate_server.console.settings import (
    ConsoleSettings,
    add_console_arguments,
    console_settings_from_args,
)
from spendgate_server.errors import ConfigError

__all__ = ["ConsoleSettings", "add_console_arguments", "console_settings_from_args", "run_console_command"]


def run_console_command(args: argparse.Namespace) -> int:
    """Run ``spendgate console``; returns the exit code.

    Raises:
        ConfigError: a bad flag, or the web stack is not installed.
    """
    settings = console_settings_from_args(args)
    try:
        from spendgate_server.console.app import run_console
    except ImportError as exc:
        raise ConfigError(
            f"the console needs its dependencies ({exc.name} is missing): pip install 'spendgate[console]'"
        ) from exc
    run_console(settings)
    return 0
