"""The four policies, and the built-in settle-anomaly flags, applied to one journaled call:
pure functions, no I/O.

settle_anomaly is not configured and cannot be turned off: the engine compares every
settle with what its Decide admitted (engine/anomalies.py) and journals what differs;
each difference becomes one violation here.

approved_models checks the **effective** model, the one that ran (SettleRequest.model):
that is the model the prompt was sent to and the provider billed, so it is what an
allowlist exists to control. A call whose requested model was unapproved but was
downgraded to an approved fallback never reached the unapproved model and is not
flagged; a call downgraded *onto* an unapproved fallback is, and its message names
both models so the admin sees that the downgrade rule caused it.

banned_patterns never copies matched text into a violation: it keeps the pattern,
the offset and an excerpt in which the match, and the whole word holding it, is
replaced by ``[REDACTED]`` (a pattern that matches only a secret's prefix must not
leak the rest of it), as is every other banned match and any long letters-and-digits
token near it (a credential no pattern named).
"""

from __future__ import annotations

import re
from typing import Any

from spendgate_server.money import format_usd
from spendgate_server.policy.journal import JournalEvent
from spendgate_server.policy.policies import MAX_SCANNED_BYTES_PER_ENTRY, CompiledPolicies
from spendgate_server.policy.violations import PatternHit, PolicyType, Violation, violation_id

__all__ = ["CENT_NANO_USD", "evaluate", "find_matches", "redacted_excerpt", "scanned_text"]

CENT_NANO_USD = 10_000_000
EXCERPT_CONTEXT_CHARS = 24
REDACTED = "[REDACTED]"
# A token this long mixing letters and digits may be a credential: never shown in an excerpt.
_SECRET_LIKE = re.compile(r"(?=\S*[A-Za-z])(?=\S*[0-9])\S{16,}")
_WORD_BREAK = re.compile(r"\s")
_SPACES = re.compile(r"\s+")


def scanned_text(text: str, limit_bytes: int = MAX_SCANNED_BYTES_PER_ENTRY) -> str:
    """The part of ``text`` the evaluator scans: its first ``limit_bytes`` of UTF-8, whole characters.

    Validation already bounds journaled prompts to this size; the cut also bounds entries
    written by anything else (an older server, a hand-edited stream).
    """
    if len(text) * 4 <= limit_bytes:
        return text
    return text.encode()[:limit_bytes].decode(errors="ignore")


def find_matches(text: str, policies: CompiledPolicies) -> list[tuple[str, int, int]]:
    """(pattern id, start, end) of each banned pattern's first match in ``text``, in characters.

    Only the first MAX_SCANNED_BYTES_PER_ENTRY bytes of ``text`` are scanned.
    """
    text = scanned_text(text)
    hits = []
    for banned, program in policies.patterns:
        match = program.search(text)
        if match is not None:
            hits.append((banned.id, match.start(), match.end()))
    return hits


def _word_span(text: str, start: int, end: int) -> tuple[int, int]:
    """Widen [start, end) to the whitespace-delimited word(s) holding it."""
    left = start
    while left > 0 and not _WORD_BREAK.match(text[left - 1]):
        left -= 1
    right = max(end, start + 1)
    while right < len(text) and not _WORD_BREAK.match(text[right]):
        right += 1
    return left, min(right, len(text))


def redacted_excerpt(text: str, start: int, end: int, others: list[tuple[int, int]]) -> str:
    """The text around [start, end) with every banned match's word redacted.

    Args:
        text: the prompt.
        start: the match reported.
        end: its end.
        others: every banned match in ``text`` (start, end), this one included or not.
    """
    left, right = _word_span(text, start, end)
    lo, hi = max(0, left - EXCERPT_CONTEXT_CHARS), min(len(text), right + EXCERPT_CONTEXT_CHARS)
    # A window edge inside a word drops that partial word: a cut never shows half a token.
    while 0 < lo < left and not _WORD_BREAK.match(text[lo - 1]):
        lo += 1
    while left < right < hi < len(text) and not _WORD_BREAK.match(text[hi]):
        hi -= 1
    spans = sorted(
        {(left, right)} | {_word_span(text, s, e) for s, e in others if s < hi and max(e, s + 1) > lo}
    )
    pieces: list[str] = []
    cursor = lo
    for s, e in spans:
        s, e = max(s, lo, cursor), min(e, hi)
        if s >= e:
            continue
        pieces += [_clean(text[cursor:s]), REDACTED]
        cursor = e
    pieces.append(_clean(text[cursor:hi]))
    return ("…" if lo > 0 else "") + "".join(pieces) + ("…" if hi < len(text) else "")


def _clean(context: str) -> str:
    return _SECRET_LIKE.sub(REDACTED, _SPACES.sub(" ", context))


def _base(event: JournalEvent, policies: CompiledPolicies) -> dict[str, Any]:
    c = event.context
    return {
        "call_time_ms": event.time_ms,
        "decision_id": event.decision_id,
        "session_id": event.session_id,
        "project": c.project,
        "requested_model": event.requested_model,
        "effective_model": event.effective_model,
        "environment": c.environment,
        "key_fingerprint": c.key_fingerprint,
        "key_label": c.key_label,
        "cost_nano_usd": event.cost_nano_usd,
        "policy_version": policies.version,
    }


def evaluate(event: JournalEvent, policies: CompiledPolicies) -> list[Violation]:
    """Every policy ``event`` breaks, one violation each (one per banned pattern)."""
    out: list[Violation] = []
    base = _base(event, policies)
    tenant, decision = event.tenant, event.decision_id
    p = policies.policies

    if not policies.model_approved(event.effective_model):
        downgraded = event.requested_model != event.effective_model
        how = f" (downgraded from {event.requested_model})" if downgraded else ""
        out.append(
            Violation(
                violation_id(tenant, decision, PolicyType.APPROVED_MODELS),
                PolicyType.APPROVED_MODELS,
                f"model {event.effective_model}{how} ran and is not in approved_models",
                approved_models=p.approved_models,
                **base,
            )
        )

    for hit in _pattern_hits(event, policies):
        excerpt = f": {hit.redacted_excerpt}" if hit.redacted_excerpt else ""
        where = "on the client" if hit.matched_on_client else "in the journaled prompt"
        out.append(
            Violation(
                violation_id(tenant, decision, PolicyType.BANNED_PATTERNS, hit.pattern_id),
                PolicyType.BANNED_PATTERNS,
                f"prompt matched banned pattern {hit.pattern_id} at offset {hit.offset} ({where}){excerpt}",
                pattern=hit,
                **base,
            )
        )

    rule = policies.key_rule(event.context.key_fingerprint, event.context.key_label)
    environment = event.context.environment
    if rule is not None and environment not in rule.environments:
        used = f"in environment {environment!r}" if environment else "with no environment reported"
        out.append(
            Violation(
                violation_id(tenant, decision, PolicyType.KEY_ENVIRONMENT_CHECK),
                PolicyType.KEY_ENVIRONMENT_CHECK,
                f"provider key {rule.key_name} used {used}; permitted: {', '.join(rule.environments)}",
                permitted_environments=rule.environments,
                **base,
            )
        )

    for anomaly in event.anomalies:
        out.append(
            Violation(
                violation_id(tenant, decision, PolicyType.SETTLE_ANOMALY, anomaly.kind.key),
                PolicyType.SETTLE_ANOMALY,
                f"{anomaly.kind.key}: {anomaly.message}",
                anomaly=anomaly,
                **base,
            )
        )

    threshold = p.approval_required_threshold_cents
    if threshold is not None and event.cost_nano_usd > threshold * CENT_NANO_USD:
        out.append(
            Violation(
                violation_id(tenant, decision, PolicyType.APPROVAL_REQUIRED_THRESHOLD),
                PolicyType.APPROVAL_REQUIRED_THRESHOLD,
                f"one call cost {format_usd(event.cost_nano_usd)}, above the review threshold of "
                f"{threshold} cents (approval_required_threshold_cents)",
                threshold_cents=threshold,
                **base,
            )
        )
    return out


def _pattern_hits(event: JournalEvent, policies: CompiledPolicies) -> list[PatternHit]:
    """Server-side matches of the journaled prompt, then the client's for patterns not found here."""
    hits: dict[str, PatternHit] = {}
    text = event.context.prompt_text
    if text and policies.patterns:
        matches = find_matches(text, policies)
        spans = [(s, e) for _, s, e in matches]
        for pattern_id, start, end in matches:
            banned = policies.pattern(pattern_id)
            hits[pattern_id] = PatternHit(
                pattern_id,
                banned.pattern if banned else "",
                start,
                redacted_excerpt(text, start, end, spans),
            )
    for pattern_id, offset in event.context.pattern_matches:
        if pattern_id not in hits:
            banned = policies.pattern(pattern_id)
            hits[pattern_id] = PatternHit(
                pattern_id, banned.pattern if banned else "", offset, matched_on_client=True
            )
    return list(hits.values())
