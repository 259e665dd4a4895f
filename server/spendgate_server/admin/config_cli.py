"""``spendgate config get|set|history``: the admin CLI of the remote config service."""

from __future__ import annotations

import argparse
from typing import Any

import grpc
from spendgate.v1 import config_pb2 as cpb
from spendgate.v1 import config_pb2_grpc

from spendgate_server.admin.documents_cli import DocumentKind, add_document_arguments, run_document_command
from spendgate_server.engine.config import EnforcementConfig, config_to_dict, parse_enforcement_config
from spendgate_server.errors import ConfigError
from spendgate_server.rpc.validation import config_from_proto
from spendgate_server.rpc.wire import config_to_proto

__all__ = ["add_config_arguments", "run_config_command"]


class _Config(DocumentKind):
    help_texts = (
        "print the current config",
        "validate a file, then write it",
        "list every change with its diff",
    )
    file_help = "YAML or JSON: the rule keys, or a mapping with 'enforcement:'"
    scoped = True
    unchanged = "(written, no rule changed)"
    no_history = "no history for the {scope}"

    def scope(self, args: argparse.Namespace) -> str:
        return f"project {args.project}" if args.project else "tenant config"

    def stub(self, channel: grpc.Channel) -> config_pb2_grpc.ConfigServiceStub:
        return config_pb2_grpc.ConfigServiceStub(channel)

    def parse(self, raw: Any, path: str) -> EnforcementConfig:
        if isinstance(raw, dict) and set(raw) == {"enforcement"}:
            raw = raw["enforcement"] or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of rule keys")
        return parse_enforcement_config(raw)

    def as_dict(self, document: EnforcementConfig) -> dict[str, Any]:
        return config_to_dict(document)

    def revision_dict(self, revision: cpb.Config) -> dict[str, Any]:
        return config_to_dict(config_from_proto(revision.enforcement_config))

    def get(self, stub: Any, args: argparse.Namespace, **call: Any) -> cpb.Config:
        config: cpb.Config = stub.GetConfig(cpb.GetConfigRequest(project=args.project), **call).config
        return config

    def update(
        self, stub: Any, args: argparse.Namespace, new: EnforcementConfig, etag: str, **call: Any
    ) -> cpb.Config:
        request = cpb.UpdateConfigRequest(
            project=args.project, enforcement_config=config_to_proto(new), etag=etag
        )
        config: cpb.Config = stub.UpdateConfig(request, **call).config
        return config

    def history(
        self, stub: Any, args: argparse.Namespace, page_size: int, page_token: str, **call: Any
    ) -> cpb.ListConfigRevisionsResponse:
        request = cpb.ListConfigRevisionsRequest(
            project=args.project, page_size=page_size, page_token=page_token
        )
        response: cpb.ListConfigRevisionsResponse = stub.ListConfigRevisions(request, **call)
        return response


_KIND = _Config()


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``config get|set|history``."""
    add_document_arguments(parser.add_subparsers(dest="action", required=True), _KIND)


def run_config_command(args: argparse.Namespace) -> int:
    """Run one config action; returns the exit code."""
    return run_document_command(_KIND, args)
