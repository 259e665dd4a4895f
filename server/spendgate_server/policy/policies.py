"""Org-wide policies: the domain form, its user-facing (YAML/JSON) form, bounds, and compilation.

Policies flag calls after the fact and never block one. Banned patterns are RE2
expressions (google-re2): matching is linear in the input whatever the pattern,
so no pattern an admin writes can hang the evaluator; a pattern RE2 refuses is
refused when the policies are set, with RE2's reason.

Linear is not cheap: RE2's time per scanned byte grows with the program it compiles
a pattern to (``.{1000}`` five times over is a 40,005-instruction program that took
5.5 s to scan one 32 KiB prompt). So a tenant's pattern cost is bounded when the
policies are written: at most ``MAX_PATTERNS`` patterns, each compiling to at most
``MAX_PATTERN_PROGRAM_SIZE`` instructions, together at most
``MAX_TOTAL_PROGRAM_SIZE``; the evaluator scans at most
``MAX_SCANNED_BYTES_PER_ENTRY`` of each prompt. At these bounds the worst sets
measured took about 21 ms per 32 KiB entry (``python -m bench.noisy`` shows the
effect on other tenants).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import re2  # type: ignore[import-untyped]  # google-re2 ships no type information

from spendgate_server.errors import FieldViolation, InvalidArgument

__all__ = [
    "MAX_PATTERNS",
    "MAX_PATTERN_CHARS",
    "MAX_PATTERN_PROGRAM_SIZE",
    "MAX_SCANNED_BYTES_PER_ENTRY",
    "MAX_TOTAL_PROGRAM_SIZE",
    "NO_POLICIES",
    "BannedPattern",
    "CompiledPolicies",
    "KeyRule",
    "Policies",
    "check_policies",
    "compile_pattern",
    "compile_policies",
    "key_fingerprint",
    "model_matches",
    "pattern_program_size",
    "policies_from_dict",
    "policies_to_dict",
]

MAX_APPROVED_MODELS = 200
MAX_PATTERNS = 100
MAX_PATTERN_CHARS = 1024
# RE2 instructions (RE2::ProgramSize) of one pattern, and of a tenant's whole set. Scan
# time per byte grows with program size; typical secret and phrase patterns use 40-600.
MAX_PATTERN_PROGRAM_SIZE = 2_000
MAX_TOTAL_PROGRAM_SIZE = 20_000
# Bytes of one journaled prompt the evaluator scans: the journal's own bound on prompt text.
MAX_SCANNED_BYTES_PER_ENTRY = 32 * 1024
MAX_KEY_RULES = 200
MAX_ENVIRONMENTS = 16
MAX_THRESHOLD_CENTS = 10**10
# Each compiled pattern may use this much memory (program and DFA caches). Programs within
# MAX_PATTERN_PROGRAM_SIZE scanned as fast with 1 MiB as with 8 MiB, and the evaluator holds
# every tenant's set, so the smaller budget bounds its memory.
PATTERN_MAX_MEM_BYTES = 1 << 20

_MODEL = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}\*?")
_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_FINGERPRINT = re.compile(r"[0-9a-f]{32}")
_LABEL = re.compile(r"[A-Za-z0-9._:@/-]{1,64}")
_ENVIRONMENT = re.compile(r"[A-Za-z0-9._-]{1,32}")

BOUNDS = {
    "approved_models": f"at most {MAX_APPROVED_MODELS} model names (1-128 characters of "
    "[A-Za-z0-9._:@/+=-], optionally ending in '*' to match a prefix)",
    "pattern_id": "1-64 characters of [A-Za-z0-9._-], unique in the set",
    "pattern": f"1-{MAX_PATTERN_CHARS} characters of RE2 syntax, compiling to at most "
    f"{MAX_PATTERN_PROGRAM_SIZE} RE2 instructions",
    "banned_patterns": f"at most {MAX_PATTERNS} patterns, together at most {MAX_TOTAL_PROGRAM_SIZE} "
    "RE2 instructions",
    "key_fingerprint": "32 lowercase hex characters (spendgate_client.key_fingerprint)",
    "key_label": "1-64 characters of [A-Za-z0-9._:@/-]",
    "environment": "1-32 characters of [A-Za-z0-9._-]",
}


@dataclass(frozen=True, slots=True)
class BannedPattern:
    """A regular expression (RE2 syntax) no prompt should match, named by ``id``."""

    id: str
    pattern: str


@dataclass(frozen=True, slots=True)
class KeyRule:
    """Where one provider key may be used; the key is named by fingerprint or by label."""

    key_fingerprint: str
    key_label: str
    environments: tuple[str, ...]

    @property
    def key_name(self) -> str:
        """How violations name the key: its label, else its fingerprint's first 12 characters."""
        return f"label {self.key_label!r}" if self.key_label else f"fingerprint {self.key_fingerprint[:12]}…"


@dataclass(frozen=True, slots=True)
class Policies:
    """A tenant's policies; each is off when empty/None."""

    approved_models: tuple[str, ...] = ()
    banned_patterns: tuple[BannedPattern, ...] = ()
    key_environment_check: tuple[KeyRule, ...] = ()
    approval_required_threshold_cents: int | None = None
    journal_prompts: bool = False


def _options() -> Any:
    options = re2.Options()
    # RE2 logs every refused pattern to stderr; the caller reports it instead.
    options.log_errors = False
    options.max_mem = PATTERN_MAX_MEM_BYTES
    return options


def compile_pattern(pattern: str) -> Any:
    """The compiled RE2 program of ``pattern``.

    Raises:
        ValueError: RE2 refuses it (its reason), or it matches the empty string (it
            would flag every prompt).
    """
    try:
        compiled = re2.compile(pattern, _options())
    except re2.error as exc:
        reason = exc.args[0] if exc.args else "invalid pattern"
        raise ValueError(reason.decode() if isinstance(reason, bytes) else str(reason)) from None
    if compiled.search("") is not None:
        raise ValueError("it matches the empty string, so it would flag every prompt")
    return compiled


def pattern_program_size(compiled: Any) -> int:
    """The size of ``compiled``'s RE2 program in instructions (RE2::ProgramSize): its scan cost."""
    return int(compiled.programsize)


def key_fingerprint(api_key: str) -> str:
    """The fingerprint of a provider API key: what clients report, never the key itself.

    The same function as ``spendgate_client.key_fingerprint`` (the server does not
    import the client; tests check that the two agree).
    """
    return hashlib.sha256(b"spendgate-provider-key-v1\x00" + api_key.encode()).hexdigest()[:32]


def model_matches(entry: str, model: str) -> bool:
    """An approved_models entry names ``model`` exactly, or by prefix when it ends in '*'."""
    return model.startswith(entry[:-1]) if entry.endswith("*") else model == entry


def check_policies(policies: Policies, prefix: str = "policies.") -> list[FieldViolation]:
    """Every bound ``policies`` breaks, each naming its field."""
    bad: list[FieldViolation] = []
    p = prefix
    # A list over its bound is one violation; its entries are not checked one by one, so a
    # huge list never costs a huge error (or compiling thousands of patterns).
    if len(policies.approved_models) > MAX_APPROVED_MODELS:
        bad.append(FieldViolation(p + "approved_models", f"must hold {BOUNDS['approved_models']}"))
    for i, model in enumerate(policies.approved_models[:MAX_APPROVED_MODELS]):
        if not _MODEL.fullmatch(model):
            bad.append(FieldViolation(f"{p}approved_models[{i}]", f"must be {BOUNDS['approved_models']}"))
    if len(policies.banned_patterns) > MAX_PATTERNS:
        bad.append(
            FieldViolation(
                p + "banned_patterns",
                f"has {len(policies.banned_patterns)} patterns; must hold {BOUNDS['banned_patterns']}",
            )
        )
    seen: set[str] = set()
    total_program_size = 0
    # Set-level problems come first, so a long list of per-pattern ones never hides them.
    set_level = len(bad)
    for i, banned in enumerate(policies.banned_patterns[:MAX_PATTERNS]):
        where = f"{p}banned_patterns[{i}]"
        if not _ID.fullmatch(banned.id) or banned.id in seen:
            bad.append(FieldViolation(where + ".id", f"must be {BOUNDS['pattern_id']}, got {banned.id!r}"))
        seen.add(banned.id)
        if not 1 <= len(banned.pattern) <= MAX_PATTERN_CHARS:
            bad.append(FieldViolation(where + ".pattern", f"must be {BOUNDS['pattern']}"))
            continue
        try:
            size = pattern_program_size(compile_pattern(banned.pattern))
        except ValueError as exc:
            bad.append(FieldViolation(where + ".pattern", f"RE2 refuses {banned.pattern!r}: {exc}"))
            continue
        total_program_size += size
        if size > MAX_PATTERN_PROGRAM_SIZE:
            bad.append(
                FieldViolation(
                    where + ".pattern",
                    f"compiles to {size} RE2 instructions, more than {MAX_PATTERN_PROGRAM_SIZE} "
                    "(use smaller repetition counts)",
                )
            )
    if total_program_size > MAX_TOTAL_PROGRAM_SIZE:
        bad.insert(
            set_level,
            FieldViolation(
                p + "banned_patterns",
                f"the patterns compile to {total_program_size} RE2 instructions together, more than "
                f"{MAX_TOTAL_PROGRAM_SIZE}; remove or simplify some",
            ),
        )
    if len(policies.key_environment_check) > MAX_KEY_RULES:
        bad.append(FieldViolation(p + "key_environment_check", f"at most {MAX_KEY_RULES} keys"))
    for i, rule in enumerate(policies.key_environment_check[:MAX_KEY_RULES]):
        where = f"{p}key_environment_check[{i}]"
        if bool(rule.key_fingerprint) == bool(rule.key_label):
            bad.append(FieldViolation(where, "set exactly one of key_fingerprint and key_label"))
        if rule.key_fingerprint and not _FINGERPRINT.fullmatch(rule.key_fingerprint):
            bad.append(FieldViolation(where + ".key_fingerprint", f"must be {BOUNDS['key_fingerprint']}"))
        if rule.key_label and not _LABEL.fullmatch(rule.key_label):
            bad.append(FieldViolation(where + ".key_label", f"must be {BOUNDS['key_label']}"))
        if not 1 <= len(rule.environments) <= MAX_ENVIRONMENTS:
            bad.append(
                FieldViolation(where + ".environments", f"must list 1-{MAX_ENVIRONMENTS} environments")
            )
        for j, env in enumerate(rule.environments[:MAX_ENVIRONMENTS]):
            if not _ENVIRONMENT.fullmatch(env):
                bad.append(FieldViolation(f"{where}.environments[{j}]", f"must be {BOUNDS['environment']}"))
    threshold = policies.approval_required_threshold_cents
    if threshold is not None and not 0 <= threshold <= MAX_THRESHOLD_CENTS:
        bad.append(
            FieldViolation(
                p + "approval_required_threshold_cents", f"must be between 0 and {MAX_THRESHOLD_CENTS}"
            )
        )
    return bad


def _pattern_id(pattern: str) -> str:
    return "re-" + hashlib.sha256(pattern.encode()).hexdigest()[:8]


def _strings(raw: Any, where: str, bad: list[FieldViolation]) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        bad.append(FieldViolation(where, "must be a list of strings"))
        return ()
    return tuple(raw)


def _items(raw: Any, where: str, bad: list[FieldViolation]) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        bad.append(FieldViolation(where, "must be a list"))
        return []
    return raw


def policies_from_dict(raw: Mapping[str, Any], prefix: str = "") -> Policies:
    """Validate the user-facing form (what ``spendgate policies set`` reads).

    A banned pattern is ``{id: ..., pattern: ...}`` or just the pattern (its id is then
    ``re-`` and 8 hex digits of its hash).

    Raises:
        InvalidArgument: naming every bad or unknown key.
    """
    bad: list[FieldViolation] = []
    known = {
        "approved_models",
        "banned_patterns",
        "key_environment_check",
        "approval_required_threshold_cents",
        "journal_prompts",
    }
    for key in sorted(set(raw) - known):
        bad.append(
            FieldViolation(prefix + key, f"unknown policy; expected one of {', '.join(sorted(known))}")
        )
    models = _strings(raw.get("approved_models"), prefix + "approved_models", bad)
    patterns: list[BannedPattern] = []
    for i, item in enumerate(_items(raw.get("banned_patterns"), prefix + "banned_patterns", bad)):
        if isinstance(item, str):
            patterns.append(BannedPattern(_pattern_id(item), item))
        elif (
            isinstance(item, Mapping)
            and isinstance(item.get("pattern"), str)
            and set(item) <= {"id", "pattern"}
        ):
            patterns.append(
                BannedPattern(str(item.get("id") or _pattern_id(item["pattern"])), item["pattern"])
            )
        else:
            bad.append(
                FieldViolation(
                    f"{prefix}banned_patterns[{i}]", "must be a pattern, or {id: ..., pattern: ...}"
                )
            )
    rules: list[KeyRule] = []
    for i, item in enumerate(_items(raw.get("key_environment_check"), prefix + "key_environment_check", bad)):
        where = f"{prefix}key_environment_check[{i}]"
        if not isinstance(item, Mapping) or not set(item) <= {"key_fingerprint", "key_label", "environments"}:
            bad.append(
                FieldViolation(where, "must be {key_fingerprint or key_label: ..., environments: [...]}")
            )
            continue
        rules.append(
            KeyRule(
                str(item.get("key_fingerprint") or ""),
                str(item.get("key_label") or ""),
                _strings(item.get("environments"), where + ".environments", bad),
            )
        )
    threshold = raw.get("approval_required_threshold_cents")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int)):
        bad.append(FieldViolation(prefix + "approval_required_threshold_cents", "must be an integer"))
        threshold = None
    journal = raw.get("journal_prompts", False)
    if not isinstance(journal, bool):
        bad.append(FieldViolation(prefix + "journal_prompts", "must be true or false"))
        journal = False
    policies = Policies(tuple(models), tuple(patterns), tuple(rules), threshold, journal)
    bad += check_policies(policies, prefix)
    if bad:
        raise InvalidArgument(bad)
    return policies


def policies_to_dict(policies: Policies) -> dict[str, Any]:
    """The user-facing form; only the policies that are on. Read back by policies_from_dict."""
    out: dict[str, Any] = {}
    if policies.approved_models:
        out["approved_models"] = list(policies.approved_models)
    if policies.banned_patterns:
        out["banned_patterns"] = [{"id": b.id, "pattern": b.pattern} for b in policies.banned_patterns]
    if policies.key_environment_check:
        out["key_environment_check"] = [
            {
                **(
                    {"key_fingerprint": r.key_fingerprint}
                    if r.key_fingerprint
                    else {"key_label": r.key_label}
                ),
                "environments": list(r.environments),
            }
            for r in policies.key_environment_check
        ]
    if policies.approval_required_threshold_cents is not None:
        out["approval_required_threshold_cents"] = policies.approval_required_threshold_cents
    if policies.journal_prompts:
        out["journal_prompts"] = True
    return out


@dataclass(frozen=True, slots=True)
class CompiledPolicies:
    """A tenant's policies at a version, with the banned patterns compiled once."""

    policies: Policies
    version: int
    patterns: tuple[tuple[BannedPattern, Any], ...]

    @property
    def journal_prompts(self) -> bool:
        """Whether prompt text is journaled and matched server-side."""
        return self.policies.journal_prompts

    def model_approved(self, model: str) -> bool:
        """True when approved_models is off or names ``model``."""
        allowed = self.policies.approved_models
        return not allowed or any(model_matches(entry, model) for entry in allowed)

    def key_rule(self, key_fingerprint: str, key_label: str) -> KeyRule | None:
        """The rule for a key, by fingerprint first, then by label."""
        rules = self.policies.key_environment_check
        if key_fingerprint:
            for rule in rules:
                if rule.key_fingerprint == key_fingerprint:
                    return rule
        if key_label:
            for rule in rules:
                if rule.key_label == key_label:
                    return rule
        return None

    def pattern(self, pattern_id: str) -> BannedPattern | None:
        """The banned pattern named ``pattern_id``, if configured."""
        return next((b for b, _ in self.patterns if b.id == pattern_id), None)


def compile_policies(policies: Policies, version: int) -> CompiledPolicies:
    """Compile the banned patterns (validated when written, so they compile)."""
    return CompiledPolicies(
        policies, version, tuple((b, compile_pattern(b.pattern)) for b in policies.banned_patterns)
    )


NO_POLICIES = compile_policies(Policies(), 0)
