"""``spendgate violations list|tail``: read the alerts feed."""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import grpc
from google.protobuf import json_format
from spendgate.v1 import violation_pb2 as vpb
from spendgate.v1 import violation_pb2_grpc

from spendgate_server.admin.channel import add_connection_arguments, call_metadata, open_channel
from spendgate_server.admin.flags import LIMIT_HELP, count, flag_errors, limited, seconds
from spendgate_server.errors import ConfigError
from spendgate_server.policy.violations import PolicyType
from spendgate_server.rpc.alerts_wire import timestamp
from spendgate_server.rpc.validation import cursor_from_proto, filter_ids_from_proto, time_range_from_proto

__all__ = ["add_violations_arguments", "format_violation", "run_violations_command"]

_DURATION = re.compile(r"(\d{1,9})([smhd])")
_LATEST_MS = 253_402_300_799_999  # the last millisecond of 9999, the end of a protobuf Timestamp
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# `violations tail` reconnects: backoff 0.5, 1, 2, 4, 8, 8 ... s; gives up after this many in a row
# (about 40 s of a server down). A stream that lived RESUME_HEALTHY_SECONDS resets the count.
RESUME_ATTEMPTS = 8
RESUME_FIRST_DELAY_SECONDS = 0.5
RESUME_MAX_DELAY_SECONDS = 8.0
RESUME_HEALTHY_SECONDS = 30.0
_NEWEST_TIMEOUT_SECONDS = 10.0  # reading the newest cursor before a live tail
# Request field → the flag that sets it, so a refusal names the flag to fix.
_FLAGS = {
    "session_id": "--session",
    "project": "--project",
    "cursor": "--cursor",
    "start_time.": "--since",
    "end_time.": "--until",
    "end_time": "--until",
}


def add_violations_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``violations list|tail``."""
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="violations, newest first")
    tail = actions.add_parser("tail", help="follow new violations; resumable with --cursor")
    for action in (listing, tail):
        add_connection_arguments(action)
        action.add_argument(
            "--type",
            default="",
            help="approved_models, banned_patterns, key_environment_check or "
            "approval_required_threshold_cents",
        )
        action.add_argument("--session", default="")
        action.add_argument("--project", default="")
        action.add_argument("--json", action="store_true", help="one JSON object per line")
        action.set_defaults(field_flags=_FLAGS)
    listing.add_argument("--since", default="", help="found after: a duration ago (30m, 2h, 7d) or ISO time")
    listing.add_argument("--until", default="", help="found before: a duration ago or ISO time")
    listing.add_argument("--limit", type=count, default=50, help=LIMIT_HELP)
    listing.add_argument("--timeout", type=seconds, default=10.0, help="deadline of each call, in seconds")
    # Both say where to start: given together, argparse refuses them in one line (exit 2).
    start = tail.add_mutually_exclusive_group()
    start.add_argument("--cursor", default="", help="resume after this cursor (printed with each violation)")
    start.add_argument("--from-start", action="store_true", help="every retained violation, then live")
    tail.add_argument("--count", type=count, default=0, help="exit after this many violations")


def _when(text: str, flag: str) -> int:
    """Unix ms of a duration ago or an ISO time (UTC unless it says otherwise).

    Raises:
        ConfigError: neither form, or a moment before 1970 (no violation is older).
    """
    match = _DURATION.fullmatch(text)
    if match:
        ms = time.time_ns() // 1_000_000 - int(match[1]) * _UNIT_SECONDS[match[2]] * 1000
    else:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError as exc:
            raise ConfigError(
                f"{flag} must be a duration (30m, 2h, 7d) or an ISO time, got {text!r}"
            ) from exc
        ms = int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp() * 1000)
    if ms < 0:
        raise ConfigError(f"{flag} {text} reaches back before 1970: no violation is that old")
    return min(ms, _LATEST_MS)


def _policy_type(name: str) -> int:
    if not name:
        return 0
    try:
        return int(PolicyType.from_key(name))
    except ValueError as exc:
        raise ConfigError(f"--type: {exc}") from exc


def format_violation(v: vpb.Violation) -> str:
    """One line for a terminal."""
    when = datetime.fromtimestamp(v.create_time.seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")
    kind = PolicyType(v.policy_type).key if v.policy_type else "?"
    project = f" project={v.project}" if v.project else ""
    return f"{when}  {kind}  session={v.session_id}{project}  {v.message}  [cursor {v.cursor}]"


def _print(v: vpb.Violation, as_json: bool) -> None:
    if as_json:
        print(json_format.MessageToJson(v, preserving_proto_field_name=True, indent=None), flush=True)
    else:
        print(format_violation(v), flush=True)


def run_violations_command(args: argparse.Namespace) -> int:
    """Run one violations action; returns the exit code."""
    policy_type = _policy_type(args.type)
    request = vpb.ListViolationsRequest(
        policy_type=policy_type,  # type: ignore[arg-type]  # PolicyType values are the wire codes
        session_id=args.session,
        project=args.project,
        # A tail reads the newest cursor first (one violation); a list's pages are sized by --limit.
        page_size=0 if args.action == "list" else 1,
    )
    if args.action == "list" and args.since:
        request.start_time.CopyFrom(timestamp(_when(args.since, "--since")))
    if args.action == "list" and args.until:
        request.end_time.CopyFrom(timestamp(_when(args.until, "--until")))
    # What the service would refuse is refused here, by its own checks, before connecting.
    with flag_errors(_FLAGS):
        filter_ids_from_proto(request.session_id, request.project)
        time_range_from_proto(
            request.start_time if request.HasField("start_time") else None,
            request.end_time if request.HasField("end_time") else None,
        )
        if args.action == "tail":
            cursor_from_proto(args.cursor)
    with open_channel(args) as channel:
        stub = violation_pb2_grpc.ViolationServiceStub(channel)
        if args.action == "list":

            def violations_page(page_size: int, page_token: str) -> tuple[Sequence[vpb.Violation], str]:
                request.page_size, request.page_token = page_size, page_token
                page = stub.ListViolations(request, timeout=args.timeout, metadata=call_metadata(args))
                return page.violations, page.next_page_token

            shown = 0
            for violation in limited(args.limit, violations_page):
                _print(violation, args.json)
                shown += 1
            if not shown and not args.json:
                print("no violations", file=sys.stderr)
            return 0
        return _tail(stub, args, policy_type)


def _tail(stub: violation_pb2_grpc.ViolationServiceStub, args: argparse.Namespace, policy_type: int) -> int:
    """Follow the feed until interrupted (or ``--count``), resuming after the server ends the stream.

    The server recycles connections (max connection age), drains on restart, or is briefly
    down: each ends the stream, cleanly or with UNAVAILABLE. The watch is reopened after the
    last cursor seen, so nothing is missed or shown twice; a live tail first reads the newest
    cursor, so a violation that lands while reconnecting is not lost either. A server not
    reached at the start ends the command at once. After
    :data:`RESUME_ATTEMPTS` reconnections with nothing received in between, the last error ends
    the command (its one line, exit 1); any other error ends it at once.
    """
    # First contact, also the newest cursor: a server not reached at all ends the command at once,
    # and a live tail resumes after this cursor, so nothing landing while it reconnects is lost.
    newest = stub.ListViolations(
        vpb.ListViolationsRequest(page_size=1), timeout=_NEWEST_TIMEOUT_SECONDS, metadata=call_metadata(args)
    )
    cursor = "0" if args.from_start else args.cursor
    if not cursor:
        # An empty feed: from its start, which is everything from now on.
        cursor = newest.violations[0].cursor if newest.violations else "0"
    seen = 0
    failures = 0
    while True:
        watch = vpb.WatchViolationsRequest(
            cursor=cursor,
            policy_type=policy_type,  # type: ignore[arg-type]  # PolicyType values are the wire codes
            session_id=args.session,
            project=args.project,
        )
        opened = time.monotonic()
        try:
            for response in stub.WatchViolations(watch, metadata=call_metadata(args)):
                _print(response.violation, args.json)
                cursor = response.violation.cursor
                seen += 1
                failures = 0
                if args.count and seen >= args.count:
                    return 0
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code is not grpc.StatusCode.UNAVAILABLE:
                raise
            if time.monotonic() - opened >= RESUME_HEALTHY_SECONDS:
                failures = 0  # a stream that lived this long was a recycled connection, not an outage
            failures += 1
            if failures > RESUME_ATTEMPTS:
                raise
        else:
            # Ended cleanly by the server (a drain): reopen at once, as a recycled connection.
            failures = 0 if time.monotonic() - opened >= RESUME_HEALTHY_SECONDS else failures + 1
            if failures > RESUME_ATTEMPTS:
                return 0
        if failures:
            time.sleep(min(RESUME_FIRST_DELAY_SECONDS * 2 ** (failures - 1), RESUME_MAX_DELAY_SECONDS))
