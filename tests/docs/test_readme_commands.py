"""Every command block of the README and docs/ runs as printed, and prints what is printed.

The runner reads each fenced ```console and ```sh block:

- ``console`` blocks are ``$ command`` lines (``\\`` continues a line) each followed by
  the output it must print (stdout and stderr, as a terminal shows them). An ellipsis
  ``…`` in the printed output stands for anything (ids, times, figures that vary); in a
  command, ``--flag ab…`` is the value an earlier command of the document printed as
  ``flag=ab…`` (a reservation id copied from ``decide`` to ``settle``).
- ``sh`` blocks run as one bash script with ``set -e``; their background jobs (``&``)
  must each come up listening on a port, not exit.
- A YAML block whose first line is ``# NAME`` is written to NAME first (the files the
  commands read, e.g. ``policies.yaml``).

Attributes after the language word (hidden when the Markdown is rendered) say how a
block runs: ``skip="why"`` (it needs a cluster, docker, or never ends), ``xfail="why"``
(a known fault, strict: the test fails once it is fixed so the mark goes), ``netns=own``
(the block starts its own servers on the README's fixed ports).

Commands run from the venv (``.venv/bin`` first on PATH, ``.venv/bin/...`` paths work)
in a scratch directory, inside a private network namespace (``unshare``, so the fixed
ports 6379, 50051, 9464 of the README clash with nothing on this machine) where
``make run`` serves, as the quick start says, unless the block asks for its own.
Servers a block leaves running are killed by process group when its namespace closes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
COMMAND_LANGUAGES = {"console", "sh"}
FENCE = re.compile(r"^```(\S*)([^\n]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
SERVE_TARGET = ("127.0.0.1", 50051)
COMMAND_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language, attributes and text."""

    document: Path
    line: int
    language: str
    attributes: dict[str, str]
    text: str

    @property
    def name(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"


def blocks(document: Path) -> list[Block]:
    """Every fenced block of ``document`` in order."""
    text = document.read_text()
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        attributes = dict(part.split("=", 1) for part in shlex.split(match[2]) if "=" in part)
        found.append(Block(document, line, match[1], attributes, match[3]))
    return found


@dataclass
class Command:
    """A ``$`` command of a console block and the lines it must print."""

    text: str
    expected: list[str] = field(default_factory=list)


def console_commands(text: str) -> list[Command]:
    """Split a console block into commands (continuations joined) and their expected output."""
    commands: list[Command] = []
    continuing = False
    for line in text.splitlines():
        if continuing:
            commands[-1].text += "\n" + line
            continuing = line.endswith("\\")
        elif line.startswith("$ "):
            commands.append(Command(line[2:]))
            continuing = line.endswith("\\")
        elif commands:
            commands[-1].expected.append(line)
        else:
            raise AssertionError(f"console block output before any '$ ' command: {line!r}")
    for command in commands:
        while command.expected and not command.expected[-1].strip():
            command.expected.pop()
    return commands


def fill_in(command: str, printed: list[str]) -> str:
    """A flag value shortened with ``…``: the value an earlier command printed as ``flag=value``.

    ``settle --reservation 01a2…`` takes the reservation the last ``decide`` printed as
    ``reservation=01a2…``, the way a reader copies it.
    """

    def value(match: re.Match[str]) -> str:
        flag, prefix = match[1], match[2]
        found = re.findall(rf"\b{re.escape(flag)}=({re.escape(prefix)}\S*)", "\n".join(printed))
        assert found, f"--{flag} {prefix}…: no earlier command printed {flag}={prefix}…"
        return f"--{flag} {found[-1]}"

    return re.sub(r"--([a-z][a-z-]*) (\S*)…", value, command)


def matches(expected: str, actual: str) -> bool:
    """Whether an output line matches its printed form (``…`` matches anything)."""
    pattern = ".*?".join(re.escape(part) for part in expected.rstrip().split("…"))
    return re.fullmatch(pattern, actual.rstrip()) is not None


class Namespace:
    """A private network namespace: the README's fixed ports are free in it.

    Every script started in it leads its own process group (background jobs included),
    and closing the namespace kills those groups and then the namespace's holder.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.holder = subprocess.Popen(
            ["unshare", "--net", "sh", "-c", "ip link set lo up && exec sleep infinity"],
            stdin=subprocess.DEVNULL,
        )
        self.started: list[subprocess.Popen[str]] = []
        deadline = time.monotonic() + 10
        while Path(f"/proc/{self.holder.pid}/cmdline").read_bytes().split(b"\0")[0] != b"sleep":
            if self.holder.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("could not make a network namespace (unshare needs root)")
            time.sleep(0.01)

    def env(self) -> dict[str, str]:
        """The environment of a shell in the venv: .venv/bin first, no SPENDGATE_* of the test run."""
        venv_bin = ROOT / ".venv" / "bin"
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("SPENDGATE_", "PYTEST", "COV_"))}
        return {**keep, "PATH": f"{venv_bin}:{os.environ['PATH']}"}

    def popen(self, script: str, sink: IO[str]) -> subprocess.Popen[str]:
        """Start bash ``script`` in the namespace and the scratch directory, output to ``sink``."""
        argv = ["nsenter", f"--target={self.holder.pid}", "--net", "bash", "-c", script]
        process = subprocess.Popen(
            argv,
            cwd=self.workdir,
            env=self.env(),
            text=True,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.started.append(process)
        return process

    def run(self, script: str, timeout: float = COMMAND_TIMEOUT_SECONDS) -> tuple[int, str]:
        """Run ``script`` until it exits (its background jobs may go on): exit code and combined output."""
        with tempfile.TemporaryFile("w+") as sink:
            process = self.popen(script, sink)
            try:
                code = process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
                sink.write(f"\n(still running after {timeout} s)")
            sink.seek(0)
            return code, sink.read()

    def close(self) -> None:
        """Kill the process groups started here (servers the blocks left running), then the holder."""
        for process in self.started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        self.holder.kill()
        self.holder.wait(10)


def scratch(tmp: Path) -> Path:
    """A working directory where ``.venv/bin/spendgate`` works as in the repository."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / ".venv").symlink_to(ROOT / ".venv")
    return tmp


def wait_for_port(
    namespace: Namespace, host: str, port: int, server: subprocess.Popen[str], log: Path
) -> None:
    """Until something listens on ``host:port`` in the namespace, or ``server`` exits."""
    deadline = time.monotonic() + COMMAND_TIMEOUT_SECONDS
    while namespace.run(f"exec 3<>/dev/tcp/{host}/{port}", timeout=10)[0] != 0:  # bash's own connect
        if server.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"`make run` did not serve on {host}:{port}:\n{log.read_text()}")
        time.sleep(0.1)


@dataclass
class Session:
    """One namespace per document where `make run` serves, as the quick start has it."""

    namespace: Namespace
    workdir: Path
    # What the document's commands printed so far, for values copied from one to the next.
    printed: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("the README runner needs root and unshare for a private network namespace")
    workdir = scratch(tmp_path_factory.mktemp("readme") / "work")
    namespace = Namespace(workdir)
    log = workdir.parent / "make-run.log"
    with log.open("w") as sink:
        # -o: the venv is what it is (the test runs in it); never rebuild it under a running suite.
        server = namespace.popen(f"exec make -s -C {shlex.quote(str(ROOT))} -o .venv/.installed run", sink)
    try:
        wait_for_port(namespace, *SERVE_TARGET, server, log)
        yield Session(namespace, workdir)
    finally:
        namespace.close()


def write_named_files(document: Path, workdir: Path) -> None:
    """Write every YAML block whose first line is ``# NAME`` to NAME."""
    for block in blocks(document):
        first = block.text.split("\n", 1)[0]
        if block.language in {"yaml", "yml"} and re.fullmatch(r"# [\w.-]+\.ya?ml", first):
            (workdir / first[2:]).write_text(block.text)


BACKGROUND_CHECK = """
for __p in $(jobs -p); do
  __up=
  for __i in $(seq 600); do
    if ! kill -0 "$__p" 2>/dev/null; then wait "$__p"; echo "background job exited $?" >&2; exit 1; fi
    if ss -ltnpH | grep -q "pid=$__p,"; then __up=1; break; fi
    sleep 0.1
  done
  [ -n "$__up" ] || { echo "background job $__p never listened" >&2; exit 1; }
done
"""


def run_block(block: Block, session: Session, tmp_path: Path) -> None:
    """Run one block and assert it ran and printed as documented."""
    if block.attributes.get("netns") == "own":
        workdir = scratch(tmp_path / "own")
        namespace = Namespace(workdir)
    else:
        workdir, namespace = session.workdir, session.namespace
    write_named_files(block.document, workdir)
    try:
        if block.language == "sh":
            code, output = namespace.run("set -e\n" + block.text + BACKGROUND_CHECK)
            assert code == 0, f"{block.name} failed (exit {code}):\n{output}"
            return
        for command in console_commands(block.text):
            _, output = namespace.run(fill_in(command.text, session.printed))
            session.printed.append(output)
            actual = output.rstrip("\n").splitlines()
            shown = "\n".join(command.expected)
            assert len(actual) == len(command.expected) and all(
                matches(e, a) for e, a in zip(command.expected, actual, strict=True)
            ), f"{block.name}: $ {command.text}\nprinted:\n{output}\nthe README shows:\n{shown}"
    finally:
        if namespace is not session.namespace:
            namespace.close()


def command_blocks() -> list[object]:
    params: list[object] = []
    for document in DOCUMENTS:
        for block in blocks(document):
            if block.language not in COMMAND_LANGUAGES:
                continue
            marks = []
            if "skip" in block.attributes:
                marks.append(pytest.mark.skip(reason=block.attributes["skip"]))
            if "xfail" in block.attributes:
                marks.append(pytest.mark.xfail(reason=block.attributes["xfail"], strict=True))
            params.append(pytest.param(block, id=block.name, marks=marks))
    return params


def test_every_command_block_is_run_or_says_why_not() -> None:
    """The runner finds the README's command blocks, and every skipped one gives its reason."""
    found = [b for d in DOCUMENTS for b in blocks(d) if b.language in COMMAND_LANGUAGES]
    assert len(found) >= 5
    assert all(b.attributes["skip"].strip() for b in found if "skip" in b.attributes)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("block", command_blocks())
def test_command_block_runs_as_printed(block: Block, session: Session, tmp_path: Path) -> None:
    """The block's commands succeed (sh) or print what the README shows (console)."""
    run_block(block, session, tmp_path)
