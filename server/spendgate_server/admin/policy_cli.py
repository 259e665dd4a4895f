"""``spendgate policies get|set|history|fingerprint``: the admin CLI of PolicyService."""

from __future__ import annotations

import argparse
import itertools
import sys
from datetime import UTC, datetime
from typing import Any

import yaml
from spendgate.v1 import policy_pb2 as ppb
from spendgate.v1 import policy_pb2_grpc

from spendgate_server.admin.channel import add_connection_arguments, call_metadata, open_channel
from spendgate_server.admin.config_cli import diff_lines
from spendgate_server.admin.flags import count, seconds
from spendgate_server.documents import read_document
from spendgate_server.errors import ConfigError, InvalidArgument
from spendgate_server.policy.policies import Policies, key_fingerprint, policies_from_dict, policies_to_dict
from spendgate_server.rpc.alerts_wire import policies_to_proto
from spendgate_server.rpc.validation import policies_from_proto

__all__ = ["add_policies_arguments", "run_policies_command"]

EXAMPLE = """\
approved_models: [claude-sonnet-4-5, "claude-haiku-4-5*"]
banned_patterns:
  - {id: openai-key, pattern: 'sk-[A-Za-z0-9_-]{20,}'}
  - 'ignore (all )?previous instructions'
key_environment_check:
  - {key_label: ci-key, environments: [staging, dev]}
approval_required_threshold_cents: 500
journal_prompts: false
"""


def add_policies_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``policies get|set|history|fingerprint``."""
    actions = parser.add_subparsers(dest="action", required=True)
    for name, text in (
        ("get", "print the current policies (YAML)"),
        ("set", "validate a YAML/JSON file (patterns compiled with RE2), then write it"),
        ("history", "list every change with its diff"),
    ):
        action = actions.add_parser(
            name,
            help=text,
            epilog="policy file example:\n" + EXAMPLE,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_connection_arguments(action)
        action.add_argument("--actor", default="", help="your name, recorded in the history (dev mode)")
        action.add_argument("--timeout", type=seconds, default=5.0, help="deadline of each call, in seconds")
        if name == "set":
            action.add_argument("file", help="YAML or JSON mapping of policies")
            action.add_argument("--etag", default=None, help="expected etag (default: the one just read)")
        if name == "history":
            action.add_argument("--limit", type=count, default=20, help="at most this many changes")
    actions.add_parser(
        "fingerprint",
        help="read a provider API key on stdin and print its fingerprint (for key_environment_check)",
    )


def _read(path: str) -> dict[str, Any]:
    raw = read_document(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of policies")
    return raw


def _parse_file(path: str) -> Policies:
    try:
        return policies_from_dict(_read(path))
    except InvalidArgument as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _as_dict(policy_set: ppb.PolicySet) -> dict[str, Any]:
    return policies_to_dict(policies_from_proto(policy_set.policies))


def _when(policy_set: ppb.PolicySet) -> str:
    if not policy_set.version:
        return "never written"
    return datetime.fromtimestamp(policy_set.update_time.seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def run_policies_command(args: argparse.Namespace) -> int:
    """Run one policies action; returns the exit code."""
    if args.action == "fingerprint":
        try:
            key = sys.stdin.readline().strip()
        except UnicodeDecodeError as exc:
            raise ConfigError("stdin is not text: pipe the provider API key in") from exc
        if not key:
            raise ConfigError("no key on stdin: pipe the provider API key in (it is hashed, never sent)")
        print(key_fingerprint(key))
        return 0
    # A bad file is refused before anything is sent.
    new = _parse_file(args.file) if args.action == "set" else None
    metadata = call_metadata(args, *((("x-spendgate-actor", args.actor),) if args.actor else ()))
    with open_channel(args) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        current = stub.GetPolicies(
            ppb.GetPoliciesRequest(), timeout=args.timeout, metadata=metadata
        ).policy_set
        if args.action == "get":
            print(
                f"# policies, version {current.version}, etag {current.etag or '-'}, "
                f"by {current.updated_by or '-'}, {_when(current)}"
            )
            rules = _as_dict(current)
            print(yaml.safe_dump(rules, sort_keys=True).rstrip() if rules else "{}")
            return 0
        if new is not None:
            changes = diff_lines(_as_dict(current), policies_to_dict(new))
            if not changes and current.version:
                print(f"no change to the policies (version {current.version})")
                return 0
            request = ppb.UpdatePoliciesRequest(
                policies=policies_to_proto(new), etag=current.etag if args.etag is None else args.etag
            )
            written = stub.UpdatePolicies(request, timeout=args.timeout, metadata=metadata).policy_set
            print(f"policies: version {current.version} -> {written.version} (etag {written.etag})")
            print("\n".join(changes) if changes else "(written, no policy changed)")
            return 0
        response = stub.ListPolicyRevisions(
            ppb.ListPolicyRevisionsRequest(page_size=min(max(args.limit, 1), 500)),
            timeout=args.timeout,
            metadata=metadata,
        )
        revisions = list(response.revisions)
        for newer, older in itertools.zip_longest(revisions, revisions[1:]):
            print(f"version {newer.version}  {_when(newer)}  by {newer.updated_by}")
            for line in diff_lines(_as_dict(older) if older else {}, _as_dict(newer)):
                print(f"  {line}")
        if not revisions:
            print("no policy history")
        return 0
