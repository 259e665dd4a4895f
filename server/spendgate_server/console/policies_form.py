"""The Policies form: the four policy types (and ``journal_prompts``) as form fields, and back.

Field names are the service's wire paths without their ``policies.`` prefix
(``banned_patterns[2].pattern``), one row per list item, so a google.rpc.BadRequest lands
beside the row it names. The form only translates: every bound, and the compilation of
every pattern with RE2, is checked by the service, the one validator of policies, and its
messages (RE2's reason for a bad pattern) are shown as they come. Blank rows are skipped
when the form is read; the row each sent item came from is remembered, so an error about
the service's k-th pattern finds its row however many blank rows came before it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from spendgate_server.errors import FieldViolation
from spendgate_server.policy.policies import BannedPattern, KeyRule, Policies

__all__ = [
    "BLANK_ROWS",
    "KEY_KINDS",
    "FormErrors",
    "KeyRow",
    "ParsedPolicies",
    "PatternRow",
    "PolicyValues",
    "errors_from",
    "form_values",
    "parse_policies_form",
    "policy_status",
]

# Empty rows offered below the stored ones for new patterns and keys (more after each save).
BLANK_ROWS = 2
# Beyond the service's own bounds (100 patterns, 200 keys): rows past these are never read.
MAX_ROWS = 1000
KEY_KINDS = (("label", "Key label"), ("fingerprint", "Key fingerprint"))
THRESHOLD = "approval_required_threshold_cents"
_INDEXED = re.compile(
    r"(approved_models|banned_patterns|key_environment_check)\[(\d+)\](?:\.(\w+))?(\[\d+\])?"
)
_ROW_FIELD = re.compile(r"(banned_patterns|key_environment_check)\[(\d{1,4})\]\.(\w+)")
# Lists are typed one item a line or separated by commas; spaces inside an item stay (and are refused).
_SPLIT = re.compile(r"[\n,]")
_CENTS = re.compile(r"[0-9]{1,18}")
# Provider keys start so; a label never needs to, and pasting the key itself is the mistake to stop.
_LOOKS_LIKE_A_KEY = re.compile(r"sk-", re.IGNORECASE)

FormErrors = dict[str, list[str]]
"""Error messages by form field name; a policy's name holds those about it as a whole, '' the rest."""


@dataclass(frozen=True, slots=True)
class PatternRow:
    """One banned pattern's row: its id and its RE2 expression, as typed."""

    id: str = ""
    pattern: str = ""

    @property
    def blank(self) -> bool:
        """Both fields empty: the row adds nothing (clearing a row removes its pattern)."""
        return not self.id and not self.pattern


@dataclass(frozen=True, slots=True)
class KeyRow:
    """One key_environment_check row: how the key is named, the name, and its environments."""

    kind: str = "label"
    key: str = ""
    environments: str = ""

    @property
    def blank(self) -> bool:
        """Key and environments empty: the row adds nothing."""
        return not self.key and not self.environments


@dataclass(frozen=True, slots=True)
class PolicyValues:
    """What the form shows: every field as text."""

    approved_models: str = ""
    patterns: tuple[PatternRow, ...] = ()
    keys: tuple[KeyRow, ...] = ()
    threshold_cents: str = ""
    journal_prompts: bool = False

    def with_blank_rows(self) -> PolicyValues:
        """The same values with BLANK_ROWS empty rows after the last filled pattern and key."""

        def padded(rows: tuple[Any, ...], blank: Any) -> tuple[Any, ...]:
            trailing = 0
            for row in reversed(rows):
                if not row.blank:
                    break
                trailing += 1
            return rows + (blank,) * max(0, BLANK_ROWS - trailing)

        return replace(self, patterns=padded(self.patterns, PatternRow()), keys=padded(self.keys, KeyRow()))


@dataclass(frozen=True, slots=True)
class ParsedPolicies:
    """A submitted form: the policies it describes (None when a field is bad) and how to map errors back."""

    policies: Policies | None
    errors: FormErrors
    values: PolicyValues
    # The form row of each pattern and key sent, in the order the service numbers them.
    pattern_rows: tuple[int, ...] = ()
    key_rows: tuple[int, ...] = ()
    models: tuple[str, ...] = ()
    environments: tuple[tuple[str, ...], ...] = field(default=())


def _words(text: str) -> tuple[str, ...]:
    return tuple(word for word in (part.strip() for part in _SPLIT.split(text)) if word)


def form_values(policies: Mapping[str, Any]) -> PolicyValues:
    """The form's values for policies in their user-facing form (``policies_to_dict``'s output)."""
    threshold = policies.get(THRESHOLD)
    return PolicyValues(
        approved_models="\n".join(policies.get("approved_models") or ()),
        patterns=tuple(PatternRow(p["id"], p["pattern"]) for p in policies.get("banned_patterns") or ()),
        keys=tuple(
            KeyRow(
                "fingerprint" if rule.get("key_fingerprint") else "label",
                rule.get("key_fingerprint") or rule.get("key_label") or "",
                ", ".join(rule.get("environments") or ()),
            )
            for rule in policies.get("key_environment_check") or ()
        ),
        threshold_cents="" if threshold is None else str(threshold),
        journal_prompts=bool(policies.get("journal_prompts")),
    ).with_blank_rows()


def _rows(form: Mapping[str, Sequence[str]], name: str) -> dict[int, dict[str, str]]:
    rows: dict[int, dict[str, str]] = {}
    for key, values in form.items():
        match = _ROW_FIELD.fullmatch(key)
        if match and match[1] == name and int(match[2]) < MAX_ROWS:
            rows.setdefault(int(match[2]), {})[match[3]] = values[0] if values else ""
    return rows


def _submitted(form: Mapping[str, Sequence[str]]) -> PolicyValues:
    def first(name: str) -> str:
        return (form.get(name) or [""])[0]

    patterns = _rows(form, "banned_patterns")
    keys = _rows(form, "key_environment_check")
    return PolicyValues(
        approved_models=first("approved_models").strip(),
        # Rows keep their numbers (gaps become blank rows), so errors find them again.
        patterns=tuple(
            PatternRow(patterns.get(i, {}).get("id", "").strip(), patterns.get(i, {}).get("pattern", ""))
            for i in range(max(patterns, default=-1) + 1)
        ),
        keys=tuple(
            KeyRow(
                keys.get(i, {}).get("kind", "label"),
                keys.get(i, {}).get("key", "").strip(),
                keys.get(i, {}).get("environments", "").strip(),
            )
            for i in range(max(keys, default=-1) + 1)
        ),
        threshold_cents=first(THRESHOLD).strip(),
        journal_prompts=bool(form.get("journal_prompts")),
    )


def parse_policies_form(form: Mapping[str, Sequence[str]]) -> ParsedPolicies:
    """Read a submitted form into Policies for the service to validate.

    Only what the wire cannot carry is checked here: a threshold that is not a whole
    number, a key named in a way the form does not offer, and a provider key pasted where
    its label belongs (it would be stored and shown in every violation).
    """
    values = _submitted(form)
    errors: FormErrors = {}
    pattern_rows = tuple(i for i, row in enumerate(values.patterns) if not row.blank)
    key_rows = tuple(i for i, row in enumerate(values.keys) if not row.blank)
    rules: list[KeyRule] = []
    environments: list[tuple[str, ...]] = []
    pasted: set[int] = set()
    for i in key_rows:
        row = values.keys[i]
        envs = _words(row.environments)
        environments.append(envs)
        if row.kind not in ("label", "fingerprint"):
            errors.setdefault(f"key_environment_check[{i}].key", []).append(
                "name the key by its label or by its fingerprint"
            )
        elif row.kind == "label" and _LOOKS_LIKE_A_KEY.match(row.key):
            errors.setdefault(f"key_environment_check[{i}].key", []).append(
                "this looks like a provider API key itself: give the key's label, or its fingerprint "
                "(spendgate policies fingerprint prints it); a key never belongs here"
            )
            pasted.add(i)
        fingerprint = row.key if row.kind == "fingerprint" else ""
        rules.append(KeyRule(fingerprint, row.key if row.kind == "label" else "", envs))
    threshold: int | None = None
    if values.threshold_cents:
        if _CENTS.fullmatch(values.threshold_cents):
            threshold = int(values.threshold_cents)
        else:
            errors[THRESHOLD] = [
                f"must be a whole number of US cents (500 is $5.00), got {values.threshold_cents!r}"
            ]
    if pasted:
        # A pasted key is not sent back to the browser in the re-shown form.
        keys = tuple(replace(row, key="") if i in pasted else row for i, row in enumerate(values.keys))
        values = replace(values, keys=keys)
    models = _words(values.approved_models)
    parsed = ParsedPolicies(
        None,
        errors,
        values,
        pattern_rows,
        key_rows,
        models,
        tuple(environments),
    )
    if errors:
        return parsed
    policies = Policies(
        approved_models=models,
        banned_patterns=tuple(
            BannedPattern(values.patterns[i].id, values.patterns[i].pattern) for i in pattern_rows
        ),
        key_environment_check=tuple(rules),
        approval_required_threshold_cents=threshold,
        journal_prompts=values.journal_prompts,
    )
    return replace(parsed, policies=policies)


def _field_and_message(violation: FieldViolation, parsed: ParsedPolicies) -> tuple[str, str]:
    path = violation.field.removeprefix("policies.")
    message = violation.description
    match = _INDEXED.fullmatch(path)
    if match is None:
        known = {"approved_models", "banned_patterns", "key_environment_check", THRESHOLD, "journal_prompts"}
        return (path if path in known else ""), message
    name, index, member, item = match[1], int(match[2]), match[3], match[4]
    if name == "approved_models":
        model = parsed.models[index] if index < len(parsed.models) else ""
        return name, f"{model!r} {message}" if model else message
    rows = parsed.pattern_rows if name == "banned_patterns" else parsed.key_rows
    if index >= len(rows):
        return name, message
    row = rows[index]
    if name == "banned_patterns":
        return f"{name}[{row}].{'id' if member == 'id' else 'pattern'}", message
    if member == "environments":
        envs = parsed.environments[index]
        j = int(item.strip("[]")) if item else -1
        if 0 <= j < len(envs):
            message = f"{envs[j]!r} {message}"
        return f"{name}[{row}].environments", message
    return f"{name}[{row}].key", message


def errors_from(violations: Sequence[FieldViolation], parsed: ParsedPolicies) -> FormErrors:
    """Group the service's violations by the form field (the row, for list items) they concern."""
    errors: FormErrors = {}
    for violation in violations:
        name, message = _field_and_message(violation, parsed)
        errors.setdefault(name, []).append(message)
    return errors


def policy_status(policies: Mapping[str, Any], key: str) -> str:
    """``on`` or ``off`` for one policy type as stored."""
    return "off" if policies.get(key) in (None, [], ()) else "on"
