"""The ``spendgate`` command: one-line errors with the documented exit codes, never a traceback.

Exit codes (README): 0 done (decide: may go ahead), 1 the service or store could not be
reached or refused the call, 2 a bad flag, value or file, 3 decide: blocked. The fuzz tests
run the command in-process through ``spendgate_server.cli.main`` against real servers (an
open one and one with keys), a private Redis and real files; a handful of cases run as real
processes, where grpc's own logging and the interpreter's exit are part of what is checked.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import grpc
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import decision_pb2_grpc
from spendgate_server import cli
from spendgate_server.engine.config import parse_enforcement_config
from spendgate_server.engine.price_units import USAGE_KEYS
from spendgate_server.errors import InvalidArgument
from spendgate_server.store.keys import Scope, new_key

from tests.processes import RedisServer, SpendgateServer, free_port

MODEL = "claude-sonnet-4-5"
COMMANDS = (
    *("serve", "decide", "settle", "keys", "config", "console", "policies", "violations", "worker"),
    *("price", "migrate-keys"),
)
# What each command may exit with (README); 70 (internal error) and tracebacks never.
DOCUMENTED = {"decide": {0, 1, 2, 3}}
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Run:
    """What one run of the command did."""

    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return self.stderr.strip().splitlines()


def run_cli(*argv: str, stdin: str = "") -> Run:
    """``spendgate *argv`` in this process, SystemExit and both streams captured."""
    out, err = io.StringIO(), io.StringIO()
    code: Any = 0
    with redirect_stdout(out), redirect_stderr(err), mock.patch("sys.stdin", io.StringIO(stdin)):
        try:
            cli.main(list(argv))
        except SystemExit as exc:
            code = exc.code
    return Run(code if isinstance(code, int) else 1, out.getvalue(), err.getvalue())


def spendgate_process(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``spendgate *argv`` as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "spendgate_server", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**_clean_env(), **(env or {})},
    )


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("SPENDGATE_", "GRPC_"))}


def assert_well_behaved(run: Run, allowed: set[int]) -> None:
    """No traceback, no internal error, at most one line on stderr, a documented exit code."""
    assert "Traceback" not in run.stderr + run.stdout
    assert run.code != cli.EXIT_INTERNAL, run.stderr
    assert run.code in allowed, (run.code, run.stderr)
    assert len(run.error_lines) <= 1, run.stderr
    if run.code not in (0, 3):
        assert len(run.error_lines) == 1 and run.error_lines[0].startswith("spendgate"), run.stderr


@dataclass
class World:
    """The real things the commands talk to."""

    open_target: str
    keyed_target: str
    unreachable_target: str
    admin_key: str
    client_key: str
    redis_url: str
    unreachable_redis_url: str
    workdir: Path
    rules_file: Path
    policies_file: Path
    servers: list[SpendgateServer] = field(default_factory=list)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    """An open server, a server with keys, a private Redis, and files the commands read and write."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("SPENDGATE_")}
    workdir = Path(tempfile.mkdtemp(prefix="sg-cli-"))
    keys_file = workdir / "server-keys.json"
    keys = {}
    for scope in Scope:
        full, record = new_key("acme", scope, f"cli-{scope.value}", 0)
        keys[scope] = full
        records = json.loads(keys_file.read_text()) if keys_file.exists() else {}
        records[record.key_id] = json.loads(record.to_json())
        keys_file.write_text(json.dumps(records))
    rules = workdir / "rules.yaml"
    rules.write_text("token_ceiling: 9000\nmax_session_usd: 100\n")
    policies = workdir / "policies.yaml"
    policies.write_text("approved_models: [claude-sonnet-4-5]\n")
    redis_server = RedisServer.start()
    open_server = SpendgateServer.start()
    keyed_server = SpendgateServer.start("--keys-file", str(keys_file))
    unreachable_target = f"127.0.0.1:{free_port()}"
    # A command line without --target must not reach whatever serves the default port here.
    os.environ["SPENDGATE_TARGET"] = unreachable_target
    yield World(
        open_target=open_server.target,
        keyed_target=keyed_server.target,
        unreachable_target=unreachable_target,
        admin_key=keys[Scope.ADMIN],
        client_key=keys[Scope.CLIENT],
        redis_url=redis_server.url,
        unreachable_redis_url=f"redis://127.0.0.1:{free_port()}/0",
        workdir=workdir,
        rules_file=rules,
        policies_file=policies,
    )
    open_server.stop()
    keyed_server.stop()
    redis_server.stop()
    del os.environ["SPENDGATE_TARGET"]
    os.environ.update(saved)


# ---------------------------------------------------------------------------------------------
# Flags and values. A command line is drawn at a noise level: at 0 every value is good (the
# command reaches the service and succeeds, or is refused there); above it, each flag may get
# any text, or a value the CLI itself must refuse (exit 2 whatever else happens), a required
# flag may be missing, and a token argparse refuses may be added.

Tokens = tuple[list[str], bool]  # argv tokens, and whether the CLI itself must refuse them

junk_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30)
names = st.from_regex(r"[A-Za-z0-9._-]{1,24}", fullmatch=True)
NEVER: st.SearchStrategy[str] = st.nothing()


@dataclass(frozen=True)
class Flag:
    """One flag: its good values, and values the CLI must refuse (exit 2)."""

    name: str  # "" for a positional argument
    good: st.SearchStrategy[str] | None  # None: a switch without a value; NEVER: given only bad
    bad: st.SearchStrategy[str] = NEVER
    required: bool = False
    junk: bool = True  # any text is worth trying (the service, not the CLI, judges it)
    always: bool = False  # always given (--target: its default may be anybody's server)


def count_flag(name: str) -> Flag:
    """A whole-number flag: negative, beyond 64 bits or a word are refused by the CLI."""
    bad = st.one_of(st.integers(max_value=-1), st.integers(min_value=2**63), st.just("many")).map(str)
    return Flag(name, st.integers(0, 20_000).map(str), bad)


def timeout_flag() -> Flag:
    return Flag("--timeout", st.sampled_from(["1", "2.5"]), st.sampled_from(["0", "-1", "nan", "inf", "1e9"]))


def config_values() -> tuple[st.SearchStrategy[str], st.SearchStrategy[str]]:
    """--config values: good ones, and ones of any shape that parse_enforcement_config refuses."""
    usd = st.decimals(0, 1000, places=3, allow_nan=False).map(str)
    good = st.fixed_dictionaries(
        {},
        optional={
            "token_ceiling": st.integers(1, 10**7),
            "max_session_usd": usd,
            "budget_mode": st.sampled_from(["crossing", "strict"]),
            "dedup_ttl_seconds": st.integers(1, 3600),
            "max_tool_calls": st.integers(0, 100),
            "model_downgrade": st.fixed_dictionaries(
                {"threshold_usd": usd, "fallback": st.just("claude-haiku-4-5-20251001")}
            ),
            "shadow": st.one_of(
                st.booleans(), st.lists(st.sampled_from(["token_ceiling", "max_tool_calls"]))
            ),
        },
    )
    values = st.one_of(
        st.integers(-5, 10**8), st.floats(allow_nan=True), st.booleans(), st.none(), junk_text,
        st.lists(st.sampled_from(["token_ceiling", "max_tool_calls", "nope"]), max_size=3),
        st.lists(st.lists(st.integers(), max_size=2), max_size=2),
        st.sampled_from(["crossing", "strict", "lenient", "1e999999999", "nan"]),
        st.fixed_dictionaries({"threshold_usd": st.sampled_from([0.01, -1, "x"]), "fallback": names}),
    )  # fmt: skip
    keys = st.sampled_from(
        ["token_ceiling", "max_session_usd", "budget_mode", "dedup_ttl_seconds", "max_tool_calls",
         "model_downgrade", "shadow", "token_ceilng", "max_sesion_usd"]
    )  # fmt: skip

    def refused(raw: Any) -> bool:
        try:
            parse_enforcement_config(raw)
        except InvalidArgument:
            return True
        return False

    bad = st.one_of(
        st.dictionaries(keys, values, min_size=1, max_size=4).filter(refused).map(json.dumps),
        st.sampled_from(["[1, 2]", '"x"', "{", "null"]),
    )
    return good.map(json.dumps), bad


def connection(world: World, reachable: bool = True) -> list[Flag]:
    """--target (an open or a keyed server, or nothing listening), --api-key, the TLS flags."""
    targets = [world.open_target, world.keyed_target] if reachable else []
    malformed = [
        "Bearer " + world.client_key,
        world.client_key[:-3],
        world.client_key + "x",
        "sk-ant-api03-abc",
        "sgk_XYZ_abc",
        "'" + world.client_key + "'",
    ]
    return [
        Flag(
            "--target",
            st.sampled_from([*targets, world.unreachable_target]),
            st.sampled_from(["", "a b", "127.0.0.1:\t1"]),
            junk=False,
            always=True,
        ),
        Flag("--api-key", st.sampled_from([world.admin_key, world.client_key]), st.sampled_from(malformed)),
        Flag("--tls-ca", NEVER, st.just(str(world.workdir / "missing.pem")), junk=False),
    ]


@st.composite
def command_line(draw: st.DrawFn, head: list[str], flags: list[Flag]) -> Tokens:
    """``head`` then the flags in any order, at a drawn noise level."""
    noise = draw(st.sampled_from([0, 0, 10, 30]))  # percent; half the command lines are clean

    def noisy() -> bool:
        return bool(noise) and draw(st.integers(0, 99)) < noise

    drawn: list[Tokens] = []
    for f in flags:
        if not (f.required or f.always) and not draw(st.booleans()):
            continue
        if f.required and noisy():
            drawn.append(([], True))  # a required argument left out
            continue
        if f.good is None:  # a switch
            drawn.append(([f.name], False))
            continue
        if f.good is NEVER:  # a flag only ever given a bad value
            if noisy():
                drawn.append(([f.name, draw(f.bad)], True))
            continue
        kind = "good"
        if noisy():
            kind = draw(st.sampled_from(["junk", "bad"] if f.junk else ["bad"]))
        if kind == "bad" and f.bad is NEVER:
            kind = "junk" if f.junk else "good"
        value = draw({"good": f.good, "junk": junk_text, "bad": f.bad}[kind])
        # A value that starts with "-" must be joined to its flag, as a user would have to.
        tokens = [f"{f.name}={value}"] if value.startswith("-") else [f.name, value]
        drawn.append((tokens if f.name else [value], kind == "bad"))
    drawn = draw(st.permutations(drawn))
    argv = [*head, *(token for tokens, _ in drawn for token in tokens)]
    # A stray word would be taken for a positional argument left out: only where there is none.
    strays = ["--bogus", "--sesion=x"] + ([] if any(not f.name for f in flags) else ["stray"])
    extra = draw(st.sampled_from(strays)) if noisy() else None
    if extra is not None:
        argv.append(extra)
    return argv, any(bad for _, bad in drawn) or extra is not None


def check(tokens: Tokens, allowed: set[int], stdin: str = "") -> Run:
    argv, must_refuse = tokens
    run = run_cli(*argv, stdin=stdin)
    event(f"exit {run.code}")  # --hypothesis-show-statistics: every code is reached
    assert_well_behaved(run, {2} if must_refuse else allowed)
    return run


# ---------------------------------------------------------------------------------------------
# The fuzz tests, one per command.


@FUZZ
@given(data=st.data())
def test_decide_fuzz(world: World, data: st.DataObject) -> None:
    """decide: any flags give 0/3 or one line with 1 or 2; a value the CLI can judge bad gives 2."""
    good_config, bad_config = config_values()
    flags = [
        *connection(world),
        Flag("--session", names, required=True),
        Flag("--model", st.sampled_from([MODEL, "gpt-4o", "my-finetune"]), required=True),
        count_flag("--input-tokens"),
        count_flag("--max-output-tokens"),
        count_flag("--tool-calls"),
        Flag("--prompt", junk_text),
        Flag("--request-id", names),
        Flag("--config", good_config, bad_config),
        timeout_flag(),
        Flag("--json", None),
    ]
    check(data.draw(command_line(["decide"], flags)), {0, 1, 2, 3})


@FUZZ
@given(data=st.data())
def test_settle_fuzz(world: World, data: st.DataObject) -> None:
    """settle: 0, or one line with 1 or 2 (an unknown reservation is NOT_FOUND: 1)."""
    # Half the time, settle a reservation that exists.
    decided = run_cli("decide", "--target", world.open_target, "--session", "settle-fuzz", "--model", MODEL)
    reservation = decided.stdout.split("reservation=")[1].split()[0]
    flags = [
        *connection(world),
        Flag("--session", st.sampled_from(["settle-fuzz"]) | names, required=True),
        Flag(
            "--reservation",
            st.sampled_from([reservation]) | st.from_regex(r"[0-9a-f]{32}", fullmatch=True),
            required=True,
        ),
        Flag("--model", st.just(MODEL), required=True),
        count_flag("--input-tokens"),
        count_flag("--output-tokens"),
        timeout_flag(),
        Flag("--json", None),
        Flag("--provider-error", None),
    ]
    check(data.draw(command_line(["settle"], flags)), {0, 1, 2})


def rules_file(world: World) -> Flag:
    """A rules or policies file: good, of any YAML shape, not YAML, missing, or a directory."""
    documents = st.recursive(
        st.none() | st.booleans() | st.integers(-5, 10**6) | junk_text,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(junk_text, inner, max_size=3),
        max_leaves=6,
    )

    def written(text: str) -> str:
        path = Path(tempfile.mkstemp(dir=world.workdir, suffix=".yaml")[1])
        path.write_text(text)
        return str(path)

    good = st.one_of(
        st.sampled_from([str(world.rules_file), str(world.policies_file)]),
        documents.map(yaml.safe_dump).map(written),
        junk_text.map(written),
    )
    bad = st.sampled_from([str(world.workdir / "missing.yaml"), str(world.workdir)])
    return Flag("", good, bad, required=True, junk=False)


@FUZZ
@given(data=st.data())
def test_config_fuzz(world: World, data: st.DataObject) -> None:
    """config get|set|history: one line with 1 or 2 on any failure; a file that cannot be read gives 2."""
    action = data.draw(st.sampled_from(["get", "set", "history"]))
    flags = [
        *connection(world),
        Flag("--project", names),
        Flag("--actor", names, st.just("a\nb")),
        timeout_flag(),
    ]
    if action == "set":
        flags += [rules_file(world), Flag("--etag", names)]
    if action == "history":
        flags.append(count_flag("--limit"))
    check(data.draw(command_line(["config", action], flags)), {0, 1, 2})


@FUZZ
@given(data=st.data())
def test_policies_fuzz(world: World, data: st.DataObject) -> None:
    """policies get|set|history|fingerprint: one line with 1 or 2 on any failure."""
    action = data.draw(st.sampled_from(["get", "set", "history", "fingerprint"]))
    if action == "fingerprint":
        stdin = data.draw(st.one_of(st.just(""), junk_text, st.just("sk-ant-api03-secret\n")))
        run = check((["policies", "fingerprint"], False), {0, 2}, stdin=stdin)
        assert (run.code == 2) == (not stdin.split("\n")[0].strip())
        return
    flags = [*connection(world), Flag("--actor", names, st.just("é")), timeout_flag()]
    if action == "set":
        flags += [rules_file(world), Flag("--etag", names)]
    if action == "history":
        flags.append(count_flag("--limit"))
    check(data.draw(command_line(["policies", action], flags)), {0, 1, 2})


@FUZZ
@given(data=st.data())
def test_violations_fuzz(world: World, data: st.DataObject) -> None:
    """violations list|tail: one line with 1 or 2 on any failure; a bad --since/--until/--type gives 2."""
    action = data.draw(st.sampled_from(["list", "tail"]))
    since = st.sampled_from(["30m", "2h", "7d", "2026-01-01", "2026-01-01T00:00:00+02:00"])
    bad_since = st.sampled_from(["yesterday", "99999999d", "1900-01-01", "9" * 5000 + "d"])
    flags = [
        # tail follows the feed until interrupted: it only ever meets a target with nothing listening.
        *connection(world, reachable=action == "list"),
        Flag("--type", st.sampled_from(["approved_models", "banned_patterns"]), st.just("nope")),
        Flag("--session", names),
        Flag("--project", names),
        Flag("--json", None),
    ]
    if action == "list":
        flags += [Flag("--since", since, bad_since), Flag("--until", since, bad_since)]
        flags += [count_flag("--limit"), timeout_flag()]
    else:
        flags += [Flag("--cursor", names), count_flag("--count"), Flag("--from-start", None)]
    check(data.draw(command_line(["violations", action], flags)), {0, 1, 2})


@FUZZ
@given(data=st.data())
def test_keys_fuzz(world: World, data: st.DataObject) -> None:
    """keys create|list|revoke: one line with 1 or 2 on any failure, against files and a real Redis."""
    action = data.draw(st.sampled_from(["create", "list", "revoke"]))
    keys_file = str(Path(tempfile.mkstemp(dir=world.workdir, suffix=".json")[1]))
    # Exactly one store: a keys file, the private Redis, or a Redis with nothing listening (exit 1).
    store = data.draw(
        st.sampled_from(
            [
                *[(["--keys-file", keys_file], False), (["--redis-url", world.redis_url], False)] * 3,
                (["--redis-url", world.unreachable_redis_url], False),
                (["--keys-file", str(world.workdir)], True),
                # Cannot be written; reading it finds no keys.
                (["--keys-file", "/proc/spendgate/keys.json"], action == "create"),
                (["--redis-url", "http://example"], True),
                (["--keys-file", keys_file, "--redis-url", world.redis_url], True),
                ([], True),
            ]
        )
    )
    flags: list[Flag] = []
    if action == "create":
        flags += [
            Flag("--tenant", names, required=True),
            Flag("--name", names, required=True),
            Flag("--scope", st.sampled_from(["client", "admin"]), st.just("root")),
        ]
    if action == "revoke":
        flags.append(Flag("", names, required=True))
    argv, must_refuse = data.draw(command_line(["keys", action, *store[0]], flags))
    run = check((argv, must_refuse or store[1]), {0, 1, 2})
    if run.code == 0 and run.stderr:
        assert run.stderr.strip().endswith("until it is restarted")


@FUZZ
@given(data=st.data())
def test_console_fuzz(world: World, data: st.DataObject) -> None:
    """console: a bad flag is one line and exit 2; good flags reach the point where it would serve."""
    number = st.sampled_from(["1", "30", "0.5"])
    flags = [
        Flag("--port", st.just("0"), st.sampled_from(["-1", "70000", "http"])),
        Flag("--host", st.just("127.0.0.1")),
        Flag("--target", st.just(world.open_target)),
        Flag("--session-idle-minutes", st.just("30"), st.just("0")),
        Flag("--session-max-hours", number, st.just("nan")),
        Flag("--rpc-timeout-seconds", number, st.just("inf")),
        Flag("--log-format", st.just("json"), st.just("xml")),
        Flag("--public-url", st.just("http://127.0.0.1:8080"), st.just("ftp://x")),
        Flag("--project", names, st.just("a b")),
        Flag("--https-cert", NEVER, st.just(str(world.rules_file)), junk=False),
    ]
    served: list[object] = []
    with mock.patch("spendgate_server.console.app.run_console", served.append):
        run = check(data.draw(command_line(["console"], flags)), {0, 2})
    assert (run.code == 0) == bool(served)


@FUZZ
@given(data=st.data())
def test_price_fuzz(world: World, data: st.DataObject) -> None:
    """price (runs locally): 0, 3 when something has no known price, or one line and 2."""
    usage = [
        Flag("--" + key.replace("_", "-"), st.integers(0, 10**9).map(str), st.just("-1"))
        for key in USAGE_KEYS
    ]
    config = rules_file(world)
    models = st.sampled_from([MODEL, "gpt-4o", "us.anthropic.claude-sonnet-4-5-v1:0", "my-finetune"])
    flags = [
        Flag("", models, required=True),
        Flag("--tier", st.sampled_from(["priority", "flex", "batch", "default"])),
        Flag("--unknown-model-price", st.sampled_from(["max", "reject"]), st.just("free"), junk=False),
        Flag("--config", config.good, config.bad, junk=False),
        Flag("--json", None),
        *data.draw(st.lists(st.sampled_from(usage), max_size=3, unique_by=lambda f: f.name)),
    ]
    check(data.draw(command_line(["price"], flags)), {0, 2, 3})


@FUZZ
@given(data=st.data())
def test_migrate_keys_fuzz(world: World, data: st.DataObject) -> None:
    """migrate-keys: against a real Redis, one with nothing listening, or a bad URL: one line on failure."""
    flags = [
        Flag(
            "--redis-url",
            st.sampled_from([world.redis_url, world.unreachable_redis_url]),
            st.just("http://example"),
            required=True,
            junk=False,
        ),
        Flag("--dry-run", None),
        Flag("--verbose", None),
    ]
    check(data.draw(command_line(["migrate-keys"], flags)), {0, 1, 2})


@FUZZ
@given(
    argv=st.lists(
        st.one_of(st.sampled_from([*COMMANDS, "--help", "-h", "--version", "get"]), junk_text), max_size=4
    )
)
def test_any_words_fuzz(world: World, argv: list[str]) -> None:
    """Any words at all: help, version or one line with exit 2, never a traceback."""
    helped = bool({"-h", "--help"} & set(argv))
    if argv[:1] in (["serve"], ["worker"], ["console"]) and not helped:
        return  # these would serve; their flags are fuzzed elsewhere
    if argv[:2] == ["violations", "tail"] and not helped:
        return  # would follow a feed
    run = run_cli(*argv)
    assert_well_behaved(run, {0, 1, 2, 3})


# ---------------------------------------------------------------------------------------------
# The cases, each with its right value.


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ('{"token_ceilng": 100}', "--config token_ceilng: unknown key"),
        ('{"max_session_usd": -1}', "--config max_session_usd: must be between 0"),
        (
            '{"token_ceiling": "100"}',
            "--config token_ceiling: must be an integer, got the text '100' (write the number in "
            "digits, not as text or in exponent form)",
        ),
        ('{"token_ceiling": "many"}', "--config token_ceiling: must be an integer, got the text 'many'"),
        ('{"token_ceiling": 1.5}', "--config token_ceiling: must be an integer, got float"),
        ('{"budget_mode": "lenient"}', "--config budget_mode: must be 'crossing' or 'strict'"),
        ('{"shadow": "yes"}', "--config shadow: must be true, false or a list of rule keys"),
        ('{"shadow": [["token_ceiling"]]}', "--config shadow: must be true, false or a list"),
        ('{"max_session_usd": "1e999999999"}', "--config max_session_usd: must be between 0 and 1000000"),
        ("[1]", "--config must be a JSON object"),
        ("{", "--config is not valid JSON"),
    ],
)
def test_decide_bad_config_is_one_line_exit_2(world: World, config: str, named: str) -> None:
    """A bad --config is one line naming the key and why, exit 2, and nothing is sent."""
    run = run_cli(
        "decide", "--target", world.unreachable_target, "--session", "s", "--model", MODEL, "--config", config
    )
    assert run.code == 2 and run.error_lines == [run.error_lines[0]]
    assert named in run.stderr


@pytest.mark.parametrize(
    ("name", "text", "prefix"),
    [
        ("rules.yaml", "token_ceiling: 10\n", ""),
        ("rules.json", '{"token_ceiling": 10}', "@"),
        ("rules.yml", "enforcement:\n  token_ceiling: 10\n", "@"),
    ],
)
def test_decide_config_reads_a_file(world: World, tmp_path: Path, name: str, text: str, prefix: str) -> None:
    """--config names a YAML or JSON file (as a path or @path), as the README says: its rules apply."""
    path = tmp_path / name
    path.write_text(text)
    argv = ["--target", world.open_target, "--session", f"file-{name}", "--model", MODEL, "--json"]
    run = run_cli("decide", *argv, "--input-tokens", "100", "--config", f"{prefix}{path}")
    assert run.code == 3, run.stderr
    assert json.loads(run.stdout)["rule"] == "token_ceiling"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[" * 40 + "]" * 40, "nested deeper than"),
        ("token_ceilng: 5\n", "--config token_ceilng: unknown key"),
        ("- 1\n", "--config must be a JSON object"),
        # YAML 1.1 reads 1e20 as text: the line says so instead of naming a Python type.
        ("token_ceiling: 1e20\n", "--config token_ceiling: must be an integer, got the text '1e20' (write"),
    ],
)
def test_decide_config_file_is_read_within_bounds(
    world: World, tmp_path: Path, text: str, named: str
) -> None:
    """A config file is read by the bounded document reader: too deep, or wrong, is exit 2, one line."""
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    argv = ["--target", world.unreachable_target, "--session", "s", "--model", MODEL]
    run = run_cli("decide", *argv, "--config", f"@{path}")
    assert run.code == 2 and len(run.error_lines) == 1, run.stderr
    assert named in run.stderr


def test_decide_config_names_a_missing_file(world: World) -> None:
    """Text that is not inline JSON names a file: a missing one is exit 2 naming it."""
    run = run_cli("decide", "--target", world.unreachable_target, "--session", "s", "--model", MODEL,
                  "--config", "@no-such-rules.yaml")  # fmt: skip
    assert run.code == 2
    missing = "spendgate: --config: cannot read no-such-rules.yaml: No such file or directory"
    assert run.error_lines == [missing]


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--input-tokens", "-1"], "argument --input-tokens: must be 0 or more, got -1"),
        (["--max-output-tokens", str(2**64)], "argument --max-output-tokens: is too large"),
        (["--tool-calls", "x"], "argument --tool-calls: must be a whole number, got 'x'"),
        (["--timeout", "nan"], "argument --timeout: must be a number of seconds above 0"),
        (["--session", "two words"], "--session: must be 1-128 characters"),
        (["--model", ""], "--model: must be 1-128 characters"),
        (["--request-id", "a b"], "--request-id: must be"),
        (
            ["--config", '{"model_downgrade": {"threshold_usd": 1, "fallback": "a b"}}'],
            "--config model_downgrade.fallback:",
        ),
    ],
)
def test_decide_bad_values_name_the_flag(world: World, flags: list[str], named: str) -> None:
    """A value the CLI or the service refuses names the flag to fix, exit 2."""
    base = {"--session": "s", "--model": MODEL}
    for name, value in zip(flags[::2], flags[1::2], strict=True):
        base[name] = value
    argv = [token for pair in base.items() for token in pair]
    run = run_cli("decide", "--target", world.open_target, *argv)
    assert run.code == 2, run.stderr
    assert len(run.error_lines) == 1 and named in run.stderr


def test_decide_prints_the_reservation_settle_needs(world: World) -> None:
    """decide prints the reservation id; settle takes it and prints text the same way; both speak --json."""
    session = "reserve-then-settle"
    base = ("--target", world.open_target, "--session", session, "--model", MODEL)
    text = run_cli("decide", *base, "--input-tokens", "100")
    assert text.code == 0
    reservation = text.stdout.split("reservation=")[1].split()[0]
    assert len(reservation) == 32

    settled = run_cli(
        "settle", *base, "--reservation", reservation, "--input-tokens", "80", "--output-tokens", "20"
    )
    assert settled.code == 0, settled.stderr
    first, second = settled.stdout.splitlines()
    assert first == f"SETTLED  reservation={reservation}  model={MODEL}"
    # 80 input tokens at $3/M and 20 output tokens at $15/M, in nano-USD.
    assert second.split()[0] == f"cost_nano_usd={80 * 3000 + 20 * 15000}"

    again = json.loads(run_cli("settle", *base, "--reservation", reservation, "--json").stdout)
    assert again["outcome"] == "ALREADY_SETTLED" and again["actual_cost_nano_usd"] == 80 * 3000 + 20 * 15000

    decided = json.loads(run_cli("decide", *base, "--json").stdout)
    assert decided["verdict"] == "ALLOW" and decided["rule"] is None and len(decided["reservation_id"]) == 32


@pytest.mark.parametrize(
    ("config", "rule"),
    [('{"token_ceiling": 10}', "token_ceiling"), ('{"max_tool_calls": 0}', "max_tool_calls")],
)
def test_decide_json_names_rules_by_their_config_key(world: World, config: str, rule: str) -> None:
    """decide --json: one object, the rule by its config key, exit 3 on a block."""
    argv = ["--target", world.open_target, "--session", f"json-{rule}", "--model", MODEL, "--config", config]
    run = run_cli("decide", *argv, "--tool-calls", "1", "--json")
    shown = json.loads(run.stdout)
    assert run.code == 3 and shown["verdict"] == "BLOCK" and shown["rule"] == rule
    assert shown["reservation_id"] is None and shown["estimated_cost_nano_usd"] == 1000 * 3000 + 1000 * 15000


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("Bearer {client}", "without 'Bearer '"),
        ("{client_short}", "has 40 characters instead of 43"),
        ("sk-ant-api03-xyz", "looks like a provider's API key"),
        ("sgk_nothex!_abc", "8 lowercase hex digits"),
    ],
)
def test_malformed_key_says_what_is_wrong(world: World, key: str, problem: str) -> None:
    """A malformed --api-key is refused before sending, saying what is wrong (exit 2)."""
    key = key.format(client=world.client_key, client_short=world.client_key[:-3])
    run = run_cli(
        "decide", "--target", world.keyed_target, "--session", "s", "--model", MODEL, "--api-key", key
    )
    assert run.code == 2 and len(run.error_lines) == 1
    assert run.stderr.startswith("spendgate: --api-key (or SPENDGATE_API_KEY) is malformed: ")
    assert problem in run.stderr and world.client_key[8:] not in run.stderr


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        ("Bearer Bearer {client}", "the API key is malformed: it starts with 'Bearer '"),
        ("Bearer {client_short}", "the API key is malformed: the secret after the key id has 40 characters"),
        ("Bearer sk-ant-api03-xyz", "the API key is malformed: it looks like a provider's API key"),
        ("Bearer", "this server requires an API key"),
    ],
)
def test_server_says_what_is_wrong_with_a_key(world: World, authorization: str, message: str) -> None:
    """The server's UNAUTHENTICATED message says what is wrong with the key, never repeating it."""
    value = authorization.format(client=world.client_key, client_short=world.client_key[:-3])
    request = pb.DecideRequest(session_id="s", model=MODEL, fingerprint=b"f" * 32)
    with grpc.insecure_channel(world.keyed_target) as channel, pytest.raises(grpc.RpcError) as info:
        decision_pb2_grpc.DecisionServiceStub(channel).Decide(
            request, timeout=5, metadata=(("authorization", value),)
        )
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert message in (info.value.details() or "")
    assert world.client_key[13:] not in (info.value.details() or "")


def test_bearer_scheme_is_case_insensitive(world: World) -> None:
    """'bearer sgk_…' is accepted like 'Bearer sgk_…' (the scheme is case-insensitive)."""
    request = pb.DecideRequest(session_id="s", model=MODEL, fingerprint=b"f" * 32)
    with grpc.insecure_channel(world.keyed_target) as channel:
        response = decision_pb2_grpc.DecisionServiceStub(channel).Decide(
            request, timeout=5, metadata=(("authorization", f"bearer {world.client_key}"),)
        )
    assert response.verdict == pb.VERDICT_ALLOW


def test_missing_key_hints_at_the_flag(world: World) -> None:
    """A keyed server refusing a call without a key: exit 1, and the line says how to give one."""
    run = run_cli("decide", "--target", world.keyed_target, "--session", "s", "--model", MODEL)
    assert run.code == 1
    assert run.error_lines == [
        f"spendgate: {world.keyed_target} refused the call: this server requires an API key: send it as "
        "'authorization: Bearer sgk_…' (pass --api-key or set SPENDGATE_API_KEY)"
    ]


def test_client_key_on_admin_call_is_one_line(world: World) -> None:
    """A client key on an admin call: the service's words, exit 1."""
    run = run_cli("violations", "list", "--target", world.keyed_target, "--api-key", world.client_key)
    assert run.code == 1
    assert len(run.error_lines) == 1 and "needs an admin key" in run.stderr


def test_config_set_refuses_a_bad_file_before_connecting(world: World) -> None:
    """config set validates the file first: every bad key on one line, exit 2, even with no server."""
    bad = world.workdir / "bad-rules.yaml"
    bad.write_text("token_ceiling: -3\nmax_sesion_usd: 5\n")
    run = run_cli("config", "set", str(bad), "--target", world.unreachable_target)
    assert run.code == 2 and len(run.error_lines) == 1
    assert "max_sesion_usd: unknown key" in run.stderr and "token_ceiling: must be between 1" in run.stderr


def test_first_key_warns_that_servers_now_require_keys(tmp_path: Path) -> None:
    """The first keys create in a store warns on stderr; the second does not."""
    keys_file = str(tmp_path / "keys.json")
    first = run_cli("keys", "create", "--keys-file", keys_file, "--tenant", "acme", "--name", "ops")
    second = run_cli("keys", "create", "--keys-file", keys_file, "--tenant", "acme", "--name", "agent")
    assert first.code == 0 and second.code == 0
    assert first.error_lines == [
        "spendgate: warning: this is the first key in this key store: servers that start from now on "
        "require a key on every call; a server already running in open development mode stays open "
        "until it is restarted"
    ]
    assert second.stderr == ""
    assert first.stdout.startswith("sgk_") and second.stdout.startswith("sgk_")


def test_unwritable_keys_file_leaves_nothing_behind(tmp_path: Path) -> None:
    """A keys file that cannot be written: one line, exit 2, and no half-written file."""
    directory = tmp_path / "keys"
    directory.mkdir()
    (directory / "keys.json").mkdir()  # a directory where the file should be
    run = run_cli(
        "keys", "create", "--keys-file", str(directory / "keys.json"), "--tenant", "a", "--name", "b"
    )
    assert run.code == 2 and len(run.error_lines) == 1 and "--keys-file" in run.stderr
    assert [p.name for p in directory.iterdir()] == ["keys.json"]


def test_version() -> None:
    """--version prints the installed version."""
    from importlib.metadata import version

    run = run_cli("--version")
    assert run.code == 0 and run.stdout == f"spendgate {version('spendgate')}\n"


def test_console_port_in_use_is_one_line(world: World) -> None:
    """A console port already taken is one line naming --port, exit 2."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = run_cli("console", "--port", str(port), "--target", world.open_target)
    assert run.code == 2
    assert run.error_lines == [
        f"spendgate: --host 127.0.0.1 --port {port}: cannot bind: address already in use"
    ]


# ---------------------------------------------------------------------------------------------
# Real processes: what only a real process shows (grpc's C-core logging, the interpreter's exit).


@pytest.mark.parametrize(
    ("argv", "code", "named"),
    [
        (
            ["decide", "--session", "s", "--model", MODEL, "--config", '{"token_ceilng": 100}'],
            2,
            "token_ceilng",
        ),
        (
            ["decide", "--session", "s", "--model", MODEL, "--config", '{"max_session_usd": -1}'],
            2,
            "max_session_usd",
        ),
        (["decide", "--session", "s", "--model", MODEL, "--config", '{"budget_mode": 1}'], 2, "budget_mode"),
        (["decide", "--session", "s", "--model", MODEL, "--api-key", "Bearer sgk_0"], 2, "without 'Bearer '"),
        (["decide", "--session", "s"], 2, "the following arguments are required: --model"),
        (
            ["settle", "--session", "s", "--reservation", "r", "--model", MODEL, "--timeout", "0"],
            2,
            "--timeout",
        ),
        (["violations", "list", "--since", "yesterday"], 2, "--since"),
        (["keys", "list"], 2, "--redis-url"),
    ],
)
def test_process_bad_input_is_one_line(argv: list[str], code: int, named: str) -> None:
    """As a real process: one line on stderr naming the problem, the documented exit code."""
    result = (
        spendgate_process(*argv, "--target", f"127.0.0.1:{free_port()}")
        if argv[0] != "keys"
        else spendgate_process(*argv)
    )
    assert result.returncode == code, result.stderr
    assert len(result.stderr.splitlines()) == 1 and named in result.stderr
    assert "Traceback" not in result.stderr


def test_process_unreachable_and_tls_failures_are_one_line(tmp_path: Path, world: World) -> None:
    """Unreachable, a CA file that is no PEM, a TLS handshake refused: one line each (grpc stays quiet)."""
    target = f"127.0.0.1:{free_port()}"
    unreachable = spendgate_process("decide", "--target", target, "--session", "s", "--model", MODEL)
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith(f"spendgate: cannot reach spendgate at {target}: ")
    assert len(unreachable.stderr.splitlines()) == 1

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    not_pem = spendgate_process("config", "get", "--target", target, "--tls-ca", str(garbage))
    assert not_pem.returncode == 2
    assert (
        not_pem.stderr == f"spendgate: --tls-ca: {garbage} is not a PEM file (it has no '-----BEGIN' line)\n"
    )

    # A real CA, but the server speaks plaintext: the handshake fails, and only our line says so.
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
         "-days", "1", "-subj", "/CN=spendgate-test-ca"],
        cwd=tmp_path, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    handshake = spendgate_process(
        "config", "get", "--target", world.open_target, "--tls-ca", str(tmp_path / "ca.pem"), "--timeout", "2"
    )
    assert handshake.returncode == 1
    assert len(handshake.stderr.splitlines()) == 1 and handshake.stderr.startswith("spendgate: "), (
        handshake.stderr
    )


def test_process_version_and_first_key(tmp_path: Path) -> None:
    """--version, and the first key's warning, as a real process."""
    assert spendgate_process("--version").stdout.startswith("spendgate ")
    created = spendgate_process(
        "keys", "create", "--keys-file", str(tmp_path / "k.json"), "--tenant", "t", "--name", "n"
    )
    assert created.returncode == 0 and created.stdout.startswith("sgk_")
    assert created.stderr.startswith("spendgate: warning: this is the first key")
