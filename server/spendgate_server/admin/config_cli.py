"""``spendgate config get|set|history``: the admin CLI of the remote config service."""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import yaml
from spendgate.v1 import config_pb2 as cpb
from spendgate.v1 import config_pb2_grpc

from spendgate_server.admin.channel import add_connection_arguments, call_metadata, open_channel
from spendgate_server.admin.flags import count, seconds
from spendgate_server.documents import read_document
from spendgate_server.engine.config import EnforcementConfig, config_to_dict, parse_enforcement_config
from spendgate_server.errors import ConfigError, InvalidArgument
from spendgate_server.rpc.validation import config_from_proto
from spendgate_server.rpc.wire import config_to_proto

__all__ = ["add_config_arguments", "diff_lines", "run_config_command"]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``config get|set|history``."""
    actions = parser.add_subparsers(dest="action", required=True)
    for name, text in (
        ("get", "print the current config"),
        ("set", "validate a file, then write it"),
        ("history", "list every change with its diff"),
    ):
        action = actions.add_parser(name, help=text)
        add_connection_arguments(action)
        action.add_argument("--project", default="", help="a project's config instead of the tenant's")
        action.add_argument("--actor", default="", help="your name, recorded in the history")
        action.add_argument("--timeout", type=seconds, default=5.0, help="deadline of each call, in seconds")
        if name == "set":
            action.add_argument("file", help="YAML or JSON: the rule keys, or a mapping with 'enforcement:'")
            action.add_argument("--etag", default=None, help="expected etag (default: the one just read)")
        if name == "history":
            action.add_argument("--limit", type=count, default=20, help="at most this many changes")


def _rules(config: cpb.Config) -> dict[str, Any]:
    return config_to_dict(config_from_proto(config.enforcement_config))


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


def _read_rules(path: str) -> dict[str, Any]:
    raw = read_document(path) or {}
    if isinstance(raw, dict) and set(raw) == {"enforcement"}:
        raw = raw["enforcement"] or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of rule keys")
    return raw


def _parse_file(path: str) -> EnforcementConfig:
    try:
        return parse_enforcement_config(_read_rules(path))
    except InvalidArgument as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _when(config: cpb.Config) -> str:
    if not config.version:
        return "never written"
    return datetime.fromtimestamp(config.update_time.seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def run_config_command(args: argparse.Namespace) -> int:
    """Run one config action; returns the exit code."""
    # A bad file is refused before anything is sent.
    new = _parse_file(args.file) if args.action == "set" else None
    metadata = call_metadata(args, *((("x-spendgate-actor", args.actor),) if args.actor else ()))
    with open_channel(args) as channel:
        stub = config_pb2_grpc.ConfigServiceStub(channel)
        current = stub.GetConfig(
            cpb.GetConfigRequest(project=args.project), timeout=args.timeout, metadata=metadata
        ).config
        scope = f"project {args.project}" if args.project else "tenant config"
        if args.action == "get":
            print(
                f"# {scope}, version {current.version}, etag {current.etag or '-'}, "
                f"by {current.updated_by or '-'}, {_when(current)}"
            )
            print(yaml.safe_dump(_rules(current), sort_keys=True).rstrip() if current.version else "{}")
            return 0
        if new is not None:
            changes = diff_lines(_rules(current), config_to_dict(new))
            if not changes and current.version:
                print(f"no change to the {scope} (version {current.version})")
                return 0
            request = cpb.UpdateConfigRequest(
                project=args.project,
                enforcement_config=config_to_proto(new),
                etag=current.etag if args.etag is None else args.etag,
            )
            written = stub.UpdateConfig(request, timeout=args.timeout, metadata=metadata).config
            print(f"{scope}: version {current.version} -> {written.version} (etag {written.etag})")
            print("\n".join(changes) if changes else "(written, no rule changed)")
            return 0
        response = stub.ListConfigRevisions(
            cpb.ListConfigRevisionsRequest(project=args.project, page_size=min(max(args.limit, 1), 500)),
            timeout=args.timeout,
            metadata=metadata,
        )
        revisions = list(response.revisions)
        for newer, older in itertools.zip_longest(revisions, revisions[1:]):
            print(f"version {newer.version}  {_when(newer)}  by {newer.updated_by}")
            for line in diff_lines(_rules(older) if older else {}, _rules(newer)):
                print(f"  {line}")
        if not revisions:
            print(f"no history for the {scope}")
        return 0
