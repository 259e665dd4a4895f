"""How the CLI's client commands reach a server: target, API key, TLS."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import grpc

from spendgate_server.errors import ConfigError

__all__ = ["add_connection_arguments", "call_metadata", "open_channel"]


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare --target, --api-key and the TLS flags (each with its SPENDGATE_* variable)."""
    env = os.environ.get
    parser.add_argument(
        "--target",
        default=env("SPENDGATE_TARGET", "127.0.0.1:50051"),
        help="host:port (env SPENDGATE_TARGET)",
    )
    parser.add_argument("--api-key", default=env("SPENDGATE_API_KEY", ""), help="env SPENDGATE_API_KEY")
    parser.add_argument(
        "--tls-ca",
        default=env("SPENDGATE_TLS_CA", ""),
        help="PEM CA that signed the server's certificate: connect with TLS",
    )
    parser.add_argument("--tls-cert", default=env("SPENDGATE_TLS_CERT", ""), help="client certificate (mTLS)")
    parser.add_argument("--tls-key", default=env("SPENDGATE_TLS_KEY", ""), help="client private key (mTLS)")


def _read(flag: str, path: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path}: {exc.strerror}") from exc


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to ``args.target``: TLS when --tls-ca is given, plaintext otherwise."""
    if not args.tls_ca:
        if args.tls_cert or args.tls_key:
            raise ConfigError("--tls-cert/--tls-key need --tls-ca")
        return grpc.insecure_channel(args.target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read("--tls-ca", args.tls_ca),
        private_key=_read("--tls-key", args.tls_key),
        certificate_chain=_read("--tls-cert", args.tls_cert),
    )
    return grpc.secure_channel(args.target, credentials)


def call_metadata(args: argparse.Namespace, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    """Per-call metadata: the API key as a bearer token, plus ``extra``."""
    key = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else ()
    return (*key, *extra)
