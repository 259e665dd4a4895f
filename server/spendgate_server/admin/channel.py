"""How the CLI's client commands reach a server: target, API key, TLS, and what a refusal means."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from spendgate_server.admin.flags import EXIT_BAD_INPUT, EXIT_FAILED, flag_of
from spendgate_server.errors import ConfigError
from spendgate_server.store.keys import key_problem

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "add_connection_arguments",
    "call_metadata",
    "check_target",
    "explain_rpc_error",
    "open_channel",
    "target_problem",
]


# Refusals whose message the service words for people: shown as they are.
_WORDED = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)
# A gRPC target: no spaces or control characters (grpc would log a resolver error on stderr).
_TARGET = re.compile(r"[!-~]{1,512}")
# Name-resolver schemes whose address ends in host[:port] (grpc's naming doc); others (unix:) have none.
_HOST_PORT_SCHEMES = ("dns:", "ipv4:", "ipv6:")
# A metadata value gRPC accepts: printable ASCII.
_METADATA_VALUE = re.compile(r"[ -~]{1,256}")


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


def target_problem(target: str) -> str | None:
    """What is wrong with the port of a gRPC ``target``, or None when it has none or a valid one.

    ``host:port``, ``[v6]:port`` and the ``dns:``/``ipv4:``/``ipv6:`` forms carry a port, which
    must be a decimal number in 1..65535 (gRPC would otherwise wrap it, and connect to another
    port, or fail later with a resolver error). A bare host (gRPC's default port), a bare IPv6
    address and the ``unix:`` forms have no port to check.
    """
    address = target
    scheme = next((s for s in _HOST_PORT_SCHEMES if target.lower().startswith(s)), None)
    if scheme is not None:
        address = target[len(scheme) :]
        if address.startswith("//"):  # dns://authority/host:port
            address = address[2:].partition("/")[2]
        address = address.split(",")[0]  # ipv4:a:1,b:2 lists addresses
    elif "://" in target or target.lower().startswith(("unix:", "unix-abstract:", "vsock:")):
        return None  # another scheme, or a socket path: no port to check
    if address.startswith("["):
        host, bracket, rest = address.partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return "a bracketed IPv6 host must be '[address]:port'"
        if not rest:
            return None  # [v6] alone: gRPC's default port
        port = rest[1:]
    elif address.count(":") == 1:
        host, _, port = address.partition(":")
    else:
        return None  # a bare host or a bare IPv6 address: no port given
    if not host.strip("["):
        return "the host is empty"
    if not port.isascii() or not port.isdigit():
        return f"the port must be a number in 1..65535, got {port!r}"
    if not 1 <= int(port) <= 65535:
        return f"the port must be in 1..65535, got {int(port)}"
    return None


def _read(flag: str, path: str) -> bytes | None:
    if not path:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path}: {exc.strerror}") from exc
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{flag}: {path} is not a PEM file (it has no '-----BEGIN' line)")
    return data


def check_target(target: str, flag: str = "--target (or SPENDGATE_TARGET)") -> None:
    """Refuse a gRPC target no connection can use: spaces, control characters, a bad port.

    Raises:
        ConfigError: naming ``flag`` and what is wrong.
    """
    if not _TARGET.fullmatch(target):
        raise ConfigError(f"{flag} must be host:port without spaces, got {target!r}")
    problem = target_problem(target)
    if problem:
        raise ConfigError(f"{flag} {target}: {problem}")


def _check(args: argparse.Namespace) -> None:
    check_target(args.target)
    key = args.api_key = args.api_key.strip()
    if key:
        problem = key_problem(key)
        if key[:7].lower() == "bearer ":
            problem = "give the key alone, without 'Bearer ' (it is sent as 'authorization: Bearer <key>')"
        if problem:
            raise ConfigError(f"--api-key (or SPENDGATE_API_KEY) is malformed: {problem}")
    actor = getattr(args, "actor", "")
    if actor and not _METADATA_VALUE.fullmatch(actor):
        raise ConfigError("--actor must be 1-256 printable ASCII characters")


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to ``args.target``: TLS when --tls-ca is given, plaintext otherwise.

    Raises:
        ConfigError: a bad --target, --api-key or --actor, or a TLS file that cannot be read.
    """
    _check(args)
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


def _status_details(exc: grpc.RpcError) -> Sequence[Any]:
    """The details (packed Any messages) of the google.rpc.Status the server attached to ``exc``."""
    trailing: Sequence[tuple[str, str | bytes]] = (
        (exc.trailing_metadata() or ()) if isinstance(exc, grpc.Call) else ()
    )
    for key, value in trailing:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            try:
                return list(status_pb2.Status.FromString(value).details)
            except DecodeError:
                return []
    return []


def _field_violations(exc: grpc.RpcError) -> list[tuple[str, str]]:
    """The BadRequest field violations the server attached to ``exc`` (AIP-193), if any."""
    for detail in _status_details(exc):
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            return [(v.field, v.description) for v in bad_request.field_violations]
    return []


def _error_reason(exc: grpc.RpcError) -> str:
    """The ErrorInfo reason the server attached to ``exc`` (rpc/status.py), or "" when none."""
    for detail in _status_details(exc):
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


def explain_rpc_error(
    exc: grpc.RpcError, args: argparse.Namespace, flags: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """The exit code and the one-line message for a failed call.

    Args:
        exc: What the stub raised.
        args: The command's flags (the target, the timeout, whether a key was given).
        flags: Request field → the flag that set it (``session_id`` → ``--session``), so the
            service's refusal of a field names the flag to fix; a key ending in ``.`` maps a prefix.
    """
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or code.name
    target = args.target
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        violations = _field_violations(exc)
        if violations and flags is not None:
            return EXIT_BAD_INPUT, "; ".join(f"{flag_of(field, flags)}: {why}" for field, why in violations)
        return EXIT_BAD_INPUT, f"the service refused the request: {details}"
    if code is grpc.StatusCode.UNAVAILABLE and _error_reason(exc) == "STORE_UNAVAILABLE":
        # The server answered: telling the user it cannot be reached would send them to the network.
        return EXIT_FAILED, f"spendgate at {target} answered, but its store is unavailable: {details}"
    if code is grpc.StatusCode.UNAVAILABLE:
        return EXIT_FAILED, f"cannot reach spendgate at {target}: {details}"
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        timeout = getattr(args, "timeout", None)
        within = f" within --timeout {timeout:g}s" if timeout else ""
        return EXIT_FAILED, f"no answer from {target}{within}"
    if code is grpc.StatusCode.UNAUTHENTICATED:
        hint = "" if args.api_key else " (pass --api-key or set SPENDGATE_API_KEY)"
        return EXIT_FAILED, f"{target} refused the call: {details}{hint}"
    if code in _WORDED:
        return EXIT_FAILED, details
    return EXIT_FAILED, f"{code.name}: {details}"
