"""The flag table: one declaration gives each command its flags, variables, help and checks."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from spendgate_server.console.settings import (
    ConsoleSettings,
    add_console_arguments,
    console_settings_from_args,
)
from spendgate_server.errors import ConfigError
from spendgate_server.flags import Flag, FlagValues, Kind, add_flags, flags_of
from spendgate_server.settings import (
    ServeSettings,
    add_serve_arguments,
    add_worker_arguments,
    settings_from_args,
)


@pytest.fixture(autouse=True)
def no_spendgate_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from an environment without SPENDGATE_* variables (conftest sets one)."""
    for name in [name for name in os.environ if name.startswith("SPENDGATE_")]:
        monkeypatch.delenv(name)


def parse(declare: Callable[[argparse.ArgumentParser], None], *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    declare(parser)
    return parser.parse_args(argv)


def test_defaults_of_the_table_are_the_settings_defaults() -> None:
    """With no flag and no variable, serve, worker and console settings equal their dataclasses' defaults."""
    assert settings_from_args(parse(add_serve_arguments)) == ServeSettings()
    assert settings_from_args(parse(add_worker_arguments)) == ServeSettings()
    assert console_settings_from_args(parse(add_console_arguments)) == ConsoleSettings()


def test_a_flag_wins_over_its_variable_which_wins_over_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """SPENDGATE_<FLAG> (SPENDGATE_CONSOLE_<FLAG> for the console) sets a default; the command line wins."""
    monkeypatch.setenv("SPENDGATE_METRICS_PORT", "9999")
    monkeypatch.setenv("SPENDGATE_CONSOLE_PORT", "8181")
    named = settings_from_args(parse(add_serve_arguments))
    assert named.metrics_port == 9999 and named.metrics_port_named
    assert settings_from_args(parse(add_worker_arguments)).metrics_port_named
    assert settings_from_args(parse(add_worker_arguments, "--metrics-port", "0")).metrics_port == 0
    assert console_settings_from_args(parse(add_console_arguments)).port == 8181
    values = FlagValues(parse(add_serve_arguments, "--port", "1"))
    assert (values.source("port"), values.source("metrics-port"), values.source("host")) == (
        "flag",
        "env",
        "default",
    )


def test_worker_ignores_the_variables_of_flags_it_does_not_take(monkeypatch: pytest.MonkeyPatch) -> None:
    """One environment configures serve and worker: a serve-only variable neither applies to a worker
    nor breaks it."""
    monkeypatch.setenv("SPENDGATE_WORKERS", "4")
    monkeypatch.setenv("SPENDGATE_PORT", "not-a-port")
    settings = settings_from_args(parse(add_worker_arguments, "--store", "redis"))
    assert (settings.workers, settings.port, settings.store) == (1, 50051, "redis")
    monkeypatch.delenv("SPENDGATE_WORKERS")
    with pytest.raises(ConfigError, match=r"^--port \(env SPENDGATE_PORT\) must be an integer"):
        settings_from_args(parse(add_serve_arguments))


def test_switches_read_their_variable_strictly(monkeypatch: pytest.MonkeyPatch) -> None:
    """--insecure is on when given, or when its variable is 1/true/yes; another word is refused, naming it."""
    assert settings_from_args(parse(add_serve_arguments, "--insecure")).insecure
    monkeypatch.setenv("SPENDGATE_INSECURE", "yes")
    assert settings_from_args(parse(add_serve_arguments)).insecure
    monkeypatch.setenv("SPENDGATE_INSECURE", "false")
    assert not settings_from_args(parse(add_serve_arguments)).insecure
    monkeypatch.setenv("SPENDGATE_INSECURE", "maybe")
    with pytest.raises(ConfigError, match="SPENDGATE_INSECURE"):
        settings_from_args(parse(add_serve_arguments))


def test_each_command_takes_its_subset_and_help_shows_defaults_and_variables() -> None:
    """worker takes no flag only serve needs; every help line names its default and its variable."""
    serve = {flag.name for flag in flags_of("serve")}
    worker = {flag.name for flag in flags_of("worker")}
    assert worker < serve
    assert {"port", "workers", "keys-file", "tls-cert", "drain-seconds", "evaluator"} <= serve - worker
    parser = argparse.ArgumentParser()
    add_flags(parser, "console")
    text = " ".join(parser.format_help().split())
    assert "(default 8080; env SPENDGATE_CONSOLE_PORT)" in text
    assert "(default 127.0.0.1:50051; env SPENDGATE_CONSOLE_TARGET or SPENDGATE_TARGET)" in text
    assert text.count("(default ") == len(flags_of("console"))


int_flags = [flag for flag in flags_of("serve") if flag.kind is Kind.INT]


# The environment fixture is the same for every example: nothing leaks between them.
@hypothesis_settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(int_flags), st.integers(min_value=-(10**12), max_value=10**12))
def test_integer_flags_accept_their_bounds_and_refuse_the_rest_naming_the_flag(row: Flag, value: int) -> None:
    """Any integer inside a flag's bounds is taken as is; any outside is a ConfigError naming the flag
    and its variable."""
    values = FlagValues(parse(add_serve_arguments, f"--{row.name}", str(value)))
    if row.low <= value <= row.high:
        assert values.integer(row.name) == value
    else:
        env = "SPENDGATE_" + row.name.upper().replace("-", "_")
        with pytest.raises(ConfigError, match=f"^--{row.name} \\(env {env}\\) must be an integer between"):
            values.integer(row.name)
