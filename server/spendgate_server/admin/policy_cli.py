"""``spendgate policies get|set|history|fingerprint``: the admin CLI of PolicyService."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import grpc
from spendgate.v1 import policy_pb2 as ppb
from spendgate.v1 import policy_pb2_grpc

from spendgate_server.admin.documents_cli import DocumentKind, add_document_arguments, run_document_command
from spendgate_server.errors import ConfigError
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


class _Policies(DocumentKind):
    help_texts = (
        "print the current policies (YAML)",
        "validate a YAML/JSON file (patterns compiled with RE2), then write it",
        "list every change with its diff",
    )
    file_help = "YAML or JSON mapping of policies"
    epilog = "policy file example:\n" + EXAMPLE
    actor_help = "your name, recorded in the history (dev mode)"
    unchanged = "(written, no policy changed)"
    no_history = "no policy history"

    def scope(self, args: argparse.Namespace) -> str:
        return "policies"

    def stub(self, channel: grpc.Channel) -> policy_pb2_grpc.PolicyServiceStub:
        return policy_pb2_grpc.PolicyServiceStub(channel)

    def parse(self, raw: Any, path: str) -> Policies:
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of policies")
        return policies_from_dict(raw)

    def as_dict(self, document: Policies) -> dict[str, Any]:
        return policies_to_dict(document)

    def revision_dict(self, revision: ppb.PolicySet) -> dict[str, Any]:
        return policies_to_dict(policies_from_proto(revision.policies))

    def get(self, stub: Any, args: argparse.Namespace, **call: Any) -> ppb.PolicySet:
        policy_set: ppb.PolicySet = stub.GetPolicies(ppb.GetPoliciesRequest(), **call).policy_set
        return policy_set

    def update(
        self, stub: Any, args: argparse.Namespace, new: Policies, etag: str, **call: Any
    ) -> ppb.PolicySet:
        request = ppb.UpdatePoliciesRequest(policies=policies_to_proto(new), etag=etag)
        policy_set: ppb.PolicySet = stub.UpdatePolicies(request, **call).policy_set
        return policy_set

    def history(
        self, stub: Any, args: argparse.Namespace, page_size: int, page_token: str, **call: Any
    ) -> ppb.ListPolicyRevisionsResponse:
        request = ppb.ListPolicyRevisionsRequest(page_size=page_size, page_token=page_token)
        response: ppb.ListPolicyRevisionsResponse = stub.ListPolicyRevisions(request, **call)
        return response


_KIND = _Policies()


def add_policies_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``policies get|set|history|fingerprint``."""
    actions = parser.add_subparsers(dest="action", required=True)
    add_document_arguments(actions, _KIND)
    actions.add_parser(
        "fingerprint",
        help="read a provider API key on stdin and print its fingerprint (for key_environment_check)",
    )


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
    return run_document_command(_KIND, args)
