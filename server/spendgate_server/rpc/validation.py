"""Wire → domain: every request field checked against its documented bound.

A request with any bad field raises InvalidArgument naming each one; nothing
reaches the engine, so nothing changes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from google.protobuf import timestamp_pb2
from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import policy_pb2 as ppb

from spendgate_server.engine.config import EnforcementConfig, Rule
from spendgate_server.engine.decide import Call, SettleCall
from spendgate_server.engine.price_units import ANCESTORS, REGISTRY, USAGE_KEYS
from spendgate_server.engine.pricing import Usage
from spendgate_server.engine.rules import RULE_UNITS
from spendgate_server.errors import FieldViolation, InvalidArgument
from spendgate_server.policy.journal import CallContext
from spendgate_server.policy.policies import BannedPattern, KeyRule, Policies, check_policies

__all__ = [
    "BOUNDS",
    "MAX_PROMPT_TEXT_BYTES",
    "call_from_proto",
    "config_from_proto",
    "cursor_from_proto",
    "etag_from_proto",
    "filter_ids_from_proto",
    "offset_page_from_proto",
    "page_size_from_proto",
    "policies_from_proto",
    "priced_usage",
    "project_from_proto",
    "session_id_from_proto",
    "settle_from_proto",
    "time_range_from_proto",
]

# Ids and names: no braces (they delimit the Redis hash tag) and no whitespace.
_NAME = re.compile(r"[A-Za-z0-9._:@/+=-]+")
_HEX_ID = re.compile(r"[0-9a-f]{32}")
_PROJECT = re.compile(r"[A-Za-z0-9._-]{1,64}")
_FINGERPRINT = re.compile(r"[0-9a-f]{32}")
_KEY_LABEL = re.compile(r"[A-Za-z0-9._:@/-]{1,64}")
_ENVIRONMENT = re.compile(r"[A-Za-z0-9._-]{1,32}")
_PATTERN_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Feed cursors are Redis stream ids: two unsigned 64-bit integers. ASCII digits only ([0-9],
# never \d, which also matches "²" and other Unicode digits int() refuses).
_CURSOR = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_MAX_STREAM_ID_PART = 2**64 - 1
# Offset page tokens (config and policy history): a position in a list of at most this many.
_OFFSET_TOKEN = re.compile(r"[0-9]{1,9}")
# Etags of config and policies are the version written (store/configs.py): a signed 64-bit counter.
_ETAG = re.compile(r"[0-9]{1,19}")
# google.protobuf.Timestamp's documented range ends at 9999-12-31T23:59:59Z; feeds begin at the epoch.
MAX_TIMESTAMP_SECONDS = 253_402_300_799
# A repeated enum field lists each value at most once in any sensible request; past this it is refused
# whole (one violation, not one per entry).
MAX_SHADOW_RULES = 16

MAX_INPUT_TOKENS = 10_000_000
MAX_OUTPUT_TOKENS = 1_000_000
MAX_TOOL_CALLS_PER_REQUEST = 10_000
# Journaled prompt text: the whole SettleRequest must stay under the server's 64 KiB message limit.
MAX_PROMPT_TEXT_BYTES = 32 * 1024
MAX_PATTERN_MATCHES = 100
# Usage counts that are neither input nor output tokens (seconds, characters, web searches, ...).
MAX_USAGE_COUNT = 1_000_000_000
_SERVICE_TIER = re.compile(r"[A-Za-z0-9._-]{0,32}")
# DecideRequest.max_usage may be a whole batch's worst case: each count's bound is a call's
# times the largest batch a provider takes (Anthropic Message Batches: 100,000 requests).
MAX_BATCH_REQUESTS = 100_000
MAX_PATTERN_OFFSET = 1 << 40

BOUNDS = {
    "session_id": "1-128 characters of [A-Za-z0-9._:@/+=-]",
    "model": "1-128 characters of [A-Za-z0-9._:@/+=-]",
    "input_tokens": f"0-{MAX_INPUT_TOKENS}",
    "max_output_tokens": f"0-{MAX_OUTPUT_TOKENS}",
    "fingerprint": "16-64 bytes",
    "tool_call_count": f"0-{MAX_TOOL_CALLS_PER_REQUEST}",
    "request_id": "empty, or 1-128 characters of [A-Za-z0-9._:@/+=-]",
    "reservation_id": "32 lowercase hex characters (DecideResponse.reservation_id)",
    "project": "empty, or 1-64 characters of [A-Za-z0-9._-]",
    "key_fingerprint": "empty, or 32 lowercase hex characters",
    "key_label": "empty, or 1-64 characters of [A-Za-z0-9._:@/-]",
    "environment": "empty, or 1-32 characters of [A-Za-z0-9._-]",
    "cursor": "a Violation.cursor: <milliseconds>-<sequence>",
    "etag": "empty (create), or the etag last read: the version number, up to 19 digits",
    "timestamp": f"seconds 0-{MAX_TIMESTAMP_SECONDS} (up to 9999-12-31) and nanos 0-999999999",
    "usage.counts": (
        f"genai-prices usage keys to counts: input tokens 0-{MAX_INPUT_TOKENS}, output tokens "
        f"0-{MAX_OUTPUT_TOKENS}, anything else 0-{MAX_USAGE_COUNT}; no part above its total"
    ),
    "usage.service_tier": "0-32 characters of [A-Za-z0-9._-]",
}


def _count_bound(key: str) -> int:
    dimensions = REGISTRY.units[key].dimensions
    if dimensions.get("family") != "tokens":
        return MAX_USAGE_COUNT
    return MAX_OUTPUT_TOKENS if dimensions.get("direction") == "output" else MAX_INPUT_TOKENS


class _Checker:
    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def bad(self, field: str, description: str) -> None:
        self.violations.append(FieldViolation(field, description))

    def name(self, field: str, value: str, *, required: bool = True, bound: str = "") -> None:
        if not value and not required:
            return
        if not 1 <= len(value) <= 128 or not _NAME.fullmatch(value):
            self.bad(field, f"must be {bound or BOUNDS['session_id']}")

    def model_name(self, field: str, value: str) -> None:
        self.name(field, value, bound=BOUNDS["model"])

    def integer(self, field: str, value: int, low: int, high: int) -> None:
        if not low <= value <= high:
            self.bad(field, f"must be between {low} and {high}, got {value}")

    def project(self, field: str, value: str) -> None:
        if value and not _PROJECT.fullmatch(value):
            self.bad(field, f"must be {BOUNDS['project']}")

    def raise_if_any(self) -> None:
        if self.violations:
            raise InvalidArgument(self.violations)


def config_from_proto(
    config: pb.EnforcementConfig, check: _Checker | None = None, prefix: str = "enforcement_config."
) -> EnforcementConfig:
    """Validate a wire EnforcementConfig into the domain form (each rule's unit checks its fields)."""
    own = check is None
    c = check or _Checker()
    fields: dict[str, Any] = {}
    for unit in RULE_UNITS:
        fields.update(unit.from_wire(config, c, prefix))
    shadow: set[Rule] = set(Rule) if config.shadow else set()
    if len(config.shadow_rules) > MAX_SHADOW_RULES:
        c.bad(
            prefix + "shadow_rules",
            f"at most {MAX_SHADOW_RULES} entries (each Rule once), got {len(config.shadow_rules)}",
        )
    else:
        for i, value in enumerate(config.shadow_rules):
            if value in Rule._value2member_map_:
                shadow.add(Rule(value))
            else:
                c.bad(f"{prefix}shadow_rules[{i}]", f"unknown Rule value {value}")
    if own:
        c.raise_if_any()
    return EnforcementConfig(**fields, shadow_rules=frozenset(shadow))


def call_from_proto(request: pb.DecideRequest, tenant: str) -> Call:
    """Validate a DecideRequest.

    Raises:
        InvalidArgument: naming every field out of bounds.
    """
    c = _Checker()
    c.name("session_id", request.session_id)
    c.name("model", request.model, bound=BOUNDS["model"])
    c.integer("input_tokens", request.input_tokens, 0, MAX_INPUT_TOKENS)
    c.integer("max_output_tokens", request.max_output_tokens, 0, MAX_OUTPUT_TOKENS)
    if not 16 <= len(request.fingerprint) <= 64:
        c.bad(
            "fingerprint",
            f"must be 16-64 bytes (a hash of the request), got {len(request.fingerprint)}",
        )
    c.integer("tool_call_count", request.tool_call_count, 0, MAX_TOOL_CALLS_PER_REQUEST)
    c.name("request_id", request.request_id, required=False, bound=BOUNDS["request_id"])
    c.project("project", request.project)
    client_config = (
        config_from_proto(request.enforcement_config, c) if request.HasField("enforcement_config") else None
    )
    max_usage = _max_usage(c, request) if request.HasField("max_usage") else None
    c.raise_if_any()
    return Call(
        tenant=tenant,
        session_id=request.session_id,
        model=request.model,
        input_tokens=request.input_tokens,
        max_output_tokens=request.max_output_tokens,
        fingerprint=request.fingerprint,
        tool_call_count=request.tool_call_count,
        request_id=request.request_id,
        client_config=client_config,
        project=request.project,
        max_usage=max_usage,
    )


def _max_usage(c: _Checker, request: pb.DecideRequest) -> Usage | None:
    """DecideRequest.max_usage when its counts are set (fields 1-4 alone mean nothing there), else None."""
    if not request.max_usage.counts:
        return None
    m = request.max_usage
    before = len(c.violations)
    _usage_counts(c, m.counts, "max_usage", MAX_BATCH_REQUESTS)
    if not _SERVICE_TIER.fullmatch(m.service_tier):
        c.bad("max_usage.service_tier", f"must be {BOUNDS['usage.service_tier']}")
    if len(c.violations) > before:
        return None  # the request is refused; a Usage of unknown keys cannot be built
    return Usage(counts=dict(m.counts), service_tier=m.service_tier)


def settle_from_proto(request: pb.SettleRequest, tenant: str) -> SettleCall:
    """Validate a SettleRequest.

    Raises:
        InvalidArgument: naming every field out of bounds.
    """
    c = _Checker()
    c.name("session_id", request.session_id)
    if not _HEX_ID.fullmatch(request.reservation_id):
        c.bad("reservation_id", f"must be {BOUNDS['reservation_id']}")
    c.name("model", request.model, bound=BOUNDS["model"])
    u = request.usage
    for field in ("input_tokens", "cache_read_input_tokens", "cache_write_input_tokens"):
        c.integer(f"usage.{field}", getattr(u, field), 0, MAX_INPUT_TOKENS)
    c.integer("usage.output_tokens", u.output_tokens, 0, MAX_OUTPUT_TOKENS)
    _usage_counts(c, u.counts)
    _service_tier(c, u.service_tier)
    if request.outcome not in (pb.PROVIDER_OUTCOME_OK, pb.PROVIDER_OUTCOME_ERROR):
        c.bad("outcome", "must be PROVIDER_OUTCOME_OK or PROVIDER_OUTCOME_ERROR")
    context = _call_context(request, c)
    c.raise_if_any()
    return SettleCall(
        tenant=tenant,
        session_id=request.session_id,
        reservation_id=request.reservation_id,
        model=request.model,
        usage=Usage(
            u.input_tokens,
            u.output_tokens,
            u.cache_read_input_tokens,
            u.cache_write_input_tokens,
            counts=dict(u.counts),
            service_tier=u.service_tier,
        ),
        provider_ok=request.outcome == pb.PROVIDER_OUTCOME_OK,
        context=context,
    )


def priced_usage(model: str, counts: Mapping[str, int], service_tier: str) -> Usage:
    """Validate what ``spendgate price`` quotes by the rules Settle applies to the same fields.

    Raises:
        InvalidArgument: naming ``model``, ``usage.counts[KEY]`` or ``usage.service_tier``.
    """
    c = _Checker()
    c.model_name("model", model)
    _usage_counts(c, counts)
    _service_tier(c, service_tier)
    c.raise_if_any()
    return Usage(counts=dict(counts), service_tier=service_tier)


def _service_tier(c: _Checker, tier: str, field: str = "usage.service_tier") -> None:
    if not _SERVICE_TIER.fullmatch(tier):
        c.bad(field, f"must be {BOUNDS['usage.service_tier']}")


def _usage_counts(c: _Checker, counts: Mapping[str, int], name: str = "usage", scale: int = 1) -> None:
    """Check Usage.counts: known keys, bounded counts, and no part above a total it belongs to.

    ``name`` is the Usage field (violations name ``<name>.counts[KEY]``); each count's
    bound is multiplied by ``scale``.
    """
    if len(counts) > len(USAGE_KEYS):
        c.bad(f"{name}.counts", f"at most {len(USAGE_KEYS)} keys, one per genai-prices usage key")
        return
    for key, value in counts.items():
        field = f"{name}.counts[{key[:64]}]"
        if key not in USAGE_KEYS:
            c.bad(
                field,
                "not a genai-prices usage key (input_tokens, output_tokens, cache_read_tokens, "
                "cache_write_tokens, cache_write_1h_tokens, input_audio_tokens, web_searches, ...)",
            )
            continue
        c.integer(field, value, 0, _count_bound(key) * scale)
        for total in sorted(ANCESTORS[key].intersection(counts)):
            if counts[total] < value:
                c.bad(field, f"{value} is more than {total} ({counts[total]}), which includes it")


_VERDICT_NAMES = {
    pb.VERDICT_UNSPECIFIED: "",
    pb.VERDICT_ALLOW: "allow",
    pb.VERDICT_ALLOW_DOWNGRADED: "allow_downgraded",
}


# Contexts without prompt text or pattern matches, by their fields: a client sends the same
# few (model, verdict, project, key, environment) on every settle, so each is checked and
# built once. Bounded: emptied when full.
_CONTEXTS: dict[tuple[str, int, str, str, str, str, bool, int], CallContext] = {}
_MAX_CONTEXTS = 1024


def _call_context(request: pb.SettleRequest, c: _Checker) -> CallContext:
    """The journal context of a SettleRequest (every field optional)."""
    if request.prompt_text or request.pattern_matches:
        return _checked_context(request, c)
    key = (
        request.requested_model,
        request.verdict,
        request.project,
        request.key_fingerprint,
        request.key_label,
        request.environment,
        request.prompt_truncated,
        request.pattern_set_version,
    )
    context = _CONTEXTS.get(key)
    if context is None:
        before = len(c.violations)
        context = _checked_context(request, c)
        if len(c.violations) == before:  # only a valid context is remembered
            if len(_CONTEXTS) >= _MAX_CONTEXTS:
                _CONTEXTS.clear()
            _CONTEXTS[key] = context
    return context


def _checked_context(request: pb.SettleRequest, c: _Checker) -> CallContext:
    """Check the context fields of ``request`` into ``c``, and build its CallContext."""
    c.name("requested_model", request.requested_model, required=False, bound=BOUNDS["model"])
    if request.verdict not in _VERDICT_NAMES:
        c.bad("verdict", "must be VERDICT_ALLOW or VERDICT_ALLOW_DOWNGRADED (a blocked call is not settled)")
    c.project("project", request.project)
    for field, value, pattern in (
        ("key_fingerprint", request.key_fingerprint, _FINGERPRINT),
        ("key_label", request.key_label, _KEY_LABEL),
        ("environment", request.environment, _ENVIRONMENT),
    ):
        if value and not pattern.fullmatch(value):
            c.bad(field, f"must be {BOUNDS[field]}")
    if len(request.prompt_text.encode()) > MAX_PROMPT_TEXT_BYTES:
        c.bad("prompt_text", f"must be at most {MAX_PROMPT_TEXT_BYTES} bytes of UTF-8 (truncate it)")
    c.integer("pattern_set_version", request.pattern_set_version, 0, 1 << 62)
    if len(request.pattern_matches) > MAX_PATTERN_MATCHES:
        c.bad("pattern_matches", f"at most {MAX_PATTERN_MATCHES} matches")
    for i, match in enumerate(request.pattern_matches[:MAX_PATTERN_MATCHES]):
        if not _PATTERN_ID.fullmatch(match.pattern_id):
            c.bad(f"pattern_matches[{i}].pattern_id", "must be 1-64 characters of [A-Za-z0-9._-]")
        c.integer(f"pattern_matches[{i}].offset", match.offset, 0, MAX_PATTERN_OFFSET)
    return CallContext(
        requested_model=request.requested_model,
        verdict=_VERDICT_NAMES.get(request.verdict, ""),
        project=request.project,
        key_fingerprint=request.key_fingerprint,
        key_label=request.key_label,
        environment=request.environment,
        prompt_text=request.prompt_text,
        prompt_truncated=request.prompt_truncated,
        pattern_set_version=request.pattern_set_version,
        pattern_matches=tuple((m.pattern_id, m.offset) for m in request.pattern_matches),
    )


def policies_from_proto(policies: ppb.Policies) -> Policies:
    """Validate wire Policies: every bound, and every banned pattern compiled with RE2.

    Raises:
        InvalidArgument: naming each bad field (``policies.banned_patterns[2].pattern``:
            RE2's reason).
    """
    c = _Checker()
    threshold = None
    if policies.HasField("approval_required_threshold_cents"):
        threshold = policies.approval_required_threshold_cents
    domain = Policies(
        approved_models=tuple(policies.approved_models),
        banned_patterns=tuple(BannedPattern(b.id, b.pattern) for b in policies.banned_patterns),
        key_environment_check=tuple(
            KeyRule(r.key_fingerprint, r.key_label, tuple(r.environments))
            for r in policies.key_environment_check
        ),
        approval_required_threshold_cents=threshold,
        journal_prompts=policies.journal_prompts,
    )
    c.violations += check_policies(domain)
    c.raise_if_any()
    return domain


def _stream_id(text: str) -> tuple[int, int] | None:
    """``<ms>-<seq>`` of ASCII digits, each part below 2**64 (every valid Redis stream id), else None."""
    match = _CURSOR.fullmatch(text)
    if match is None:
        return None
    parts = (int(match.group(1)), int(match.group(2)))
    return parts if max(parts) <= _MAX_STREAM_ID_PART else None


def page_size_from_proto(page_size: int, page_token: str, *, default: int, maximum: int) -> int:
    """Validate a page size (0: ``default``) and that the token is a cursor or empty.

    Raises:
        InvalidArgument: naming ``page_size`` or ``page_token``.
    """
    c = _Checker()
    c.integer("page_size", page_size, 0, maximum)
    # A page token is an exclusive upper bound this server gave: never 0-0, before which nothing is.
    if page_token and _stream_id(page_token) in (None, (0, 0)):
        c.bad("page_token", "not a token from a previous page")
    c.raise_if_any()
    return page_size or default


def offset_page_from_proto(page_size: int, page_token: str, *, default: int, maximum: int) -> tuple[int, int]:
    """Validate a page of an offset-paged list: ``(page size, offset)``.

    The token is empty (the first page) or a ``next_page_token`` this server gave: up to 9
    ASCII digits.

    Raises:
        InvalidArgument: naming ``page_size`` or ``page_token``.
    """
    c = _Checker()
    c.integer("page_size", page_size, 0, maximum)
    if page_token and not _OFFSET_TOKEN.fullmatch(page_token):
        c.bad("page_token", "not a token from a previous page")
    c.raise_if_any()
    return page_size or default, int(page_token or 0)


def cursor_from_proto(cursor: str, field: str = "cursor") -> str:
    """Validate a feed cursor: empty, "0" (the start) or a Violation.cursor.

    Every valid stream id is accepted, the largest too (nothing follows it; the store
    answers such a cursor with no entries). The CLI's ``--cursor`` is checked here as well.

    Raises:
        InvalidArgument: naming ``field``.
    """
    if cursor and cursor != "0" and _stream_id(cursor) is None:
        raise InvalidArgument([FieldViolation(field, f'must be empty, "0" or {BOUNDS["cursor"]}')])
    return cursor


def _timestamp_ms(timestamp: timestamp_pb2.Timestamp, field: str, c: _Checker) -> int:
    if not 0 <= timestamp.seconds <= MAX_TIMESTAMP_SECONDS:
        c.bad(field + ".seconds", f"must be between 0 and {MAX_TIMESTAMP_SECONDS}, got {timestamp.seconds}")
    if not 0 <= timestamp.nanos <= 999_999_999:
        c.bad(field + ".nanos", f"must be between 0 and 999999999, got {timestamp.nanos}")
    return timestamp.seconds * 1000 + timestamp.nanos // 1_000_000


def time_range_from_proto(
    start: timestamp_pb2.Timestamp | None, end: timestamp_pb2.Timestamp | None
) -> tuple[int, int | None]:
    """``[start, end)`` as Unix milliseconds (``0`` and ``None`` when unset).

    Raises:
        InvalidArgument: naming ``start_time.seconds``, ``end_time.nanos``... when out of
            range, or ``end_time`` when it is not after ``start_time``.
    """
    c = _Checker()
    since = 0 if start is None else _timestamp_ms(start, "start_time", c)
    until = None if end is None else _timestamp_ms(end, "end_time", c)
    c.raise_if_any()
    if until is not None and until <= since:
        raise InvalidArgument([FieldViolation("end_time", "must be after start_time")])
    return since, until


def etag_from_proto(etag: str) -> str:
    """Validate the etag of an update (AIP-154): empty to create, else an etag this service gave.

    A malformed etag can never match, so it is refused as bad input rather than reported as
    someone else's write (FAILED_PRECONDITION).

    Raises:
        InvalidArgument: naming ``etag``.
    """
    if etag and not _ETAG.fullmatch(etag):
        raise InvalidArgument([FieldViolation("etag", f"must be {BOUNDS['etag']}")])
    return etag


def filter_ids_from_proto(session_id: str, project: str) -> tuple[str, str]:
    """Validate the session and project of a filter (empty: any) by the rules Decide applies.

    A filter no Decide could ever have recorded is refused rather than answered with nothing.

    Raises:
        InvalidArgument: naming ``session_id`` or ``project``.
    """
    c = _Checker()
    c.name("session_id", session_id, required=False)
    c.project("project", project)
    c.raise_if_any()
    return session_id, project


def project_from_proto(project: str) -> str:
    """Validate a project name field.

    Raises:
        InvalidArgument: naming ``project``.
    """
    c = _Checker()
    c.project("project", project)
    c.raise_if_any()
    return project


def session_id_from_proto(session_id: str) -> str:
    """Validate a session id field.

    Raises:
        InvalidArgument: naming ``session_id``.
    """
    c = _Checker()
    c.name("session_id", session_id)
    c.raise_if_any()
    return session_id
