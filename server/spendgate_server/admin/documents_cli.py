"""The command shape of versioned documents (config, policies): ``get|set|history``.

Both documents are read, compare-and-set written and listed by revision the same way;
a ``DocumentKind`` says only what differs: its stub and messages, how a file is parsed,
and how a revision reads as a flat mapping for diffs.
"""

from __future__ import annotations

import argparse
import itertools
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar

import grpc
import yaml

from spendgate_server.admin.channel import add_connection_arguments, call_metadata, open_channel
from spendgate_server.admin.flags import LIMIT_HELP, count, flag_errors, limited, seconds
from spendgate_server.documents import read_document
from spendgate_server.errors import ConfigError, InvalidArgument
from spendgate_server.rpc.validation import etag_from_proto, project_from_proto

__all__ = ["DocumentKind", "add_document_arguments", "diff_lines", "run_document_command"]


class DocumentKind(ABC):
    """What one kind of document adds to the shared command shape.

    Calls take the stub, the parsed arguments, and ``call``: the ``timeout`` and
    ``metadata`` keyword arguments of every RPC. A revision is the service's message
    (spendgate.v1.Config, spendgate.v1.PolicySet): ``version``, ``etag``,
    ``updated_by``, ``update_time`` and the document.
    """

    # What get, set and history do, for --help.
    help_texts: ClassVar[tuple[str, str, str]]
    # The positional file argument of ``set``, for --help.
    file_help: ClassVar[str]
    # Help epilog of each action (an example file), or None.
    epilog: ClassVar[str | None] = None
    # Whether the document is per project (adds ``--project``).
    scoped: ClassVar[bool] = False
    # Help of ``--actor``.
    actor_help: ClassVar[str] = "your name, recorded in the history"
    # Printed after a write that changed nothing in the document.
    unchanged: ClassVar[str]
    # Printed when there is no revision; ``{scope}`` is replaced.
    no_history: ClassVar[str]

    @abstractmethod
    def scope(self, args: argparse.Namespace) -> str:
        """The document's name in messages (``tenant config``, ``policies``)."""

    @abstractmethod
    def stub(self, channel: grpc.Channel) -> Any:
        """The service's client stub."""

    @abstractmethod
    def parse(self, raw: Any, path: str) -> Any:
        """The domain document of a file's parsed contents; raises InvalidArgument or ConfigError."""

    @abstractmethod
    def as_dict(self, document: Any) -> dict[str, Any]:
        """The user-facing mapping of a domain document (what ``parse`` reads back)."""

    @abstractmethod
    def revision_dict(self, revision: Any) -> dict[str, Any]:
        """The user-facing mapping of a revision message."""

    @abstractmethod
    def get(self, stub: Any, args: argparse.Namespace, **call: Any) -> Any:
        """The current revision."""

    @abstractmethod
    def update(self, stub: Any, args: argparse.Namespace, new: Any, etag: str, **call: Any) -> Any:
        """Write ``new`` if the current etag is ``etag``; the written revision."""

    @abstractmethod
    def history(
        self, stub: Any, args: argparse.Namespace, page_size: int, page_token: str, **call: Any
    ) -> Any:
        """One page of revisions, newest first: the response (``revisions``, ``next_page_token``)."""


def add_document_arguments(actions: Any, kind: DocumentKind) -> None:
    """Declare ``get|set|history`` of ``kind`` on a subparsers object."""
    for name, text in zip(("get", "set", "history"), kind.help_texts, strict=True):
        extra: dict[str, Any] = {}
        if kind.epilog is not None:
            extra = {"epilog": kind.epilog, "formatter_class": argparse.RawDescriptionHelpFormatter}
        action = actions.add_parser(name, help=text, **extra)
        add_connection_arguments(action)
        if kind.scoped:
            action.add_argument("--project", default="", help="a project's config instead of the tenant's")
        action.add_argument("--actor", default="", help=kind.actor_help)
        action.add_argument("--timeout", type=seconds, default=5.0, help="deadline of each call, in seconds")
        if name == "set":
            action.add_argument("file", help=kind.file_help)
            action.add_argument("--etag", default=None, help="expected etag (default: the one just read)")
        if name == "history":
            action.add_argument("--limit", type=count, default=20, help=LIMIT_HELP)


def diff_lines(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """Key-by-key changes: ``+ key: value``, ``- key: value``, ``~ key: old -> new``."""
    lines = []
    for key in sorted(set(before) | set(after)):
        if key not in before:
            lines.append(f"+ {key}: {json.dumps(after[key])}")
        elif key not in after:
            lines.append(f"- {key}: {json.dumps(before[key])}")
        elif before[key] != after[key]:
            lines.append(f"~ {key}: {json.dumps(before[key])} -> {json.dumps(after[key])}")
    return lines


def _parse_file(kind: DocumentKind, path: str) -> Any:
    raw = read_document(path) or {}
    try:
        return kind.parse(raw, path)
    except InvalidArgument as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _when(revision: Any) -> str:
    if not revision.version:
        return "never written"
    return datetime.fromtimestamp(revision.update_time.seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def run_document_command(kind: DocumentKind, args: argparse.Namespace) -> int:
    """Run one ``get|set|history`` action on ``kind``; returns the exit code."""
    # Bad flags and a bad file are refused before anything is sent.
    with flag_errors({"project": "--project", "etag": "--etag"}):
        if kind.scoped:
            project_from_proto(args.project)
        if args.action == "set" and args.etag is not None:
            etag_from_proto(args.etag)
    new = _parse_file(kind, args.file) if args.action == "set" else None
    metadata = call_metadata(args, *((("x-spendgate-actor", args.actor),) if args.actor else ()))
    call: dict[str, Any] = {"timeout": args.timeout, "metadata": metadata}
    scope = kind.scope(args)
    with open_channel(args) as channel:
        stub = kind.stub(channel)
        current = kind.get(stub, args, **call)
        if args.action == "get":
            print(
                f"# {scope}, version {current.version}, etag {current.etag or '-'}, "
                f"by {current.updated_by or '-'}, {_when(current)}"
            )
            rules = kind.revision_dict(current)
            print(yaml.safe_dump(rules, sort_keys=True).rstrip() if rules else "{}")
            return 0
        if new is not None:
            changes = diff_lines(kind.revision_dict(current), kind.as_dict(new))
            etag = current.etag if args.etag is None else args.etag
            # A stale --etag is refused by the service whether or not the content changed (AIP-154).
            if not changes and current.version and etag == current.etag:
                print(f"no change to the {scope} (version {current.version})")
                return 0
            written = kind.update(stub, args, new, etag, **call)
            print(f"{scope}: version {current.version} -> {written.version} (etag {written.etag})")
            print("\n".join(changes) if changes else kind.unchanged)
            return 0

        def history_page(page_size: int, page_token: str) -> tuple[Sequence[Any], str]:
            page = kind.history(stub, args, page_size, page_token, **call)
            return page.revisions, page.next_page_token

        revisions: list[Any] = list(limited(args.limit, history_page))
        for newer, older in itertools.zip_longest(revisions, revisions[1:]):
            print(f"version {newer.version}  {_when(newer)}  by {newer.updated_by}")
            for line in diff_lines(kind.revision_dict(older) if older else {}, kind.revision_dict(newer)):
                print(f"  {line}")
        if not revisions:
            print(kind.no_history.format(scope=scope))
        return 0
