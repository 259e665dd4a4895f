"""The Rules form: the enforcement config's user-facing keys as form fields, and back.

The form's field names are the config keys of the README's rules table
(``model_downgrade.threshold_usd`` for the nested ones), so an error from
``parse_enforcement_config`` or a BadRequest from the service lands beside the field it
names. The form does no range checks of its own: those stay in one place, the parser the
CLI and the server use, and the service has the last word.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from spendgate_server.engine.config import EnforcementConfig, config_to_dict, parse_enforcement_config
from spendgate_server.errors import FieldViolation, InvalidArgument

__all__ = [
    "BUDGET_MODES",
    "RULE_KEYS",
    "RULE_SECTIONS",
    "FormErrors",
    "RuleSection",
    "TextField",
    "errors_from",
    "field_for_violation",
    "form_values",
    "parse_rules_form",
    "rule_status",
    "rules_of",
    "submitted_values",
]

SHADOW = "shadow"
_INTEGER = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True, slots=True)
class TextField:
    """One text input of the form."""

    name: str
    label: str
    hint: str
    inputmode: str = "numeric"
    # "int": digits only, converted before parsing; "text": passed through as typed.
    kind: str = "int"

    @property
    def html_id(self) -> str:
        """An id without dots, so it needs no escaping in CSS selectors or fragment links."""
        return "f-" + self.name.replace(".", "-")


@dataclass(frozen=True, slots=True)
class RuleSection:
    """A rule's fieldset: its key (also its shadow checkbox value), title and inputs."""

    key: str
    title: str
    summary: str
    fields: tuple[TextField, ...]

    @property
    def shadow_id(self) -> str:
        """The id of this rule's shadow checkbox."""
        return f"f-shadow-{self.key}"


RULE_SECTIONS = (
    RuleSection(
        "token_ceiling",
        "Token ceiling",
        "Block a call whose input tokens exceed the ceiling.",
        (TextField("token_ceiling", "Most input tokens per call", "Blank turns the rule off."),),
    ),
    RuleSection(
        "max_session_usd",
        "Session budget",
        "Cap what one session id may spend (settled plus reserved); then its calls block.",
        (
            TextField(
                "max_session_usd",
                "Budget per session, US dollars",
                "For example 5 or 0.25. Blank turns the rule off.",
                inputmode="decimal",
                kind="text",
            ),
        ),
    ),
    RuleSection(
        "dedup_ttl_seconds",
        "Duplicate requests",
        "Block a request identical to one admitted in the same session within the window.",
        (TextField("dedup_ttl_seconds", "Window, seconds", "Blank turns the rule off."),),
    ),
    RuleSection(
        "max_tool_calls",
        "Tool-call limit",
        "Block the call that would take a session's tool results above the limit.",
        (TextField("max_tool_calls", "Most tool calls per session", "Blank turns the rule off."),),
    ),
    RuleSection(
        "model_downgrade",
        "Model downgrade",
        "Run a call on a cheaper model when its estimated cost exceeds the threshold.",
        (
            TextField(
                "model_downgrade.threshold_usd",
                "Threshold per call, US dollars",
                "Both blank turns the rule off.",
                inputmode="decimal",
                kind="text",
            ),
            TextField(
                "model_downgrade.fallback",
                "Fallback model",
                "A model with a known price, e.g. claude-haiku-4-5-20251001.",
                inputmode="text",
                kind="text",
            ),
        ),
    ),
)
RULE_KEYS = tuple(section.key for section in RULE_SECTIONS)
BUDGET_MODES = (
    ("crossing", "Crossing: may exceed it by one call"),
    ("strict", "Strict: never exceeds it"),
)

# Service field paths (wire names, google.rpc.BadRequest) → the form field they concern.
_WIRE_FIELDS = {
    "enforcement_config.token_ceiling": "token_ceiling",
    "enforcement_config.max_session_nano_usd": "max_session_usd",
    "enforcement_config.budget_mode": "budget_mode",
    "enforcement_config.dedup_ttl_seconds": "dedup_ttl_seconds",
    "enforcement_config.max_tool_calls": "max_tool_calls",
    "enforcement_config.model_downgrade": "model_downgrade.threshold_usd",
    "enforcement_config.model_downgrade.threshold_nano_usd": "model_downgrade.threshold_usd",
    "enforcement_config.model_downgrade.fallback_model": "model_downgrade.fallback",
    "enforcement_config.shadow": SHADOW,
    "project": "project",
}
_FORM_FIELDS = frozenset(
    {f.name for s in RULE_SECTIONS for f in s.fields} | {"budget_mode", SHADOW, "project"}
)

FormErrors = dict[str, list[str]]
"""Error messages by form field name; '' holds those that concern no one field."""


def field_for_violation(field: str) -> str:
    """The form field a violation names, from the parser's keys or the service's wire paths."""
    if field in _FORM_FIELDS:
        return field
    if field.startswith("enforcement_config.shadow_rules"):
        return SHADOW
    if field == "model_downgrade":
        return "model_downgrade.threshold_usd"
    return _WIRE_FIELDS.get(field, "")


def errors_from(violations: Sequence[FieldViolation]) -> FormErrors:
    """Group violations by the form field they concern."""
    errors: FormErrors = {}
    for violation in violations:
        errors.setdefault(field_for_violation(violation.field), []).append(violation.description)
    return errors


def form_values(rules: Mapping[str, Any]) -> dict[str, Any]:
    """The form's values for a config in its user-facing form (``config_to_dict``'s output)."""
    downgrade = rules.get("model_downgrade") or {}
    shadow = rules.get(SHADOW)
    return {
        "token_ceiling": str(rules.get("token_ceiling", "")),
        "max_session_usd": str(rules.get("max_session_usd", "")),
        "budget_mode": str(rules.get("budget_mode", "crossing")),
        "dedup_ttl_seconds": str(rules.get("dedup_ttl_seconds", "")),
        "max_tool_calls": str(rules.get("max_tool_calls", "")),
        "model_downgrade.threshold_usd": str(downgrade.get("threshold_usd", "")),
        "model_downgrade.fallback": str(downgrade.get("fallback", "")),
        SHADOW: frozenset(RULE_KEYS) if shadow is True else frozenset(shadow or ()),
    }


def submitted_values(form: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The values as typed, to show the form again after an error or a conflict."""
    values: dict[str, Any] = {
        name: (form.get(name) or [""])[0].strip() for name in _FORM_FIELDS - {SHADOW, "project"}
    }
    values["budget_mode"] = values["budget_mode"] or "crossing"
    values[SHADOW] = frozenset(form.get(SHADOW) or ())
    return values


def parse_rules_form(form: Mapping[str, Sequence[str]]) -> tuple[EnforcementConfig | None, FormErrors]:
    """Build the config a submitted form describes.

    Returns:
        The config, or None with the errors by field when any field is bad.
    """
    values = submitted_values(form)
    local: list[FieldViolation] = []
    raw: dict[str, Any] = {}
    for section in RULE_SECTIONS:
        for text_field in section.fields:
            text = values[text_field.name]
            if not text or text_field.name.startswith("model_downgrade."):
                continue
            if text_field.kind == "int":
                if not _INTEGER.fullmatch(text):
                    local.append(FieldViolation(text_field.name, f"must be a whole number, got {text!r}"))
                    continue
                raw[text_field.name] = int(text)
            else:
                raw[text_field.name] = text.removeprefix("$")
    if values["budget_mode"] != "crossing":
        raw["budget_mode"] = values["budget_mode"]
    threshold, fallback = values["model_downgrade.threshold_usd"], values["model_downgrade.fallback"]
    if threshold and fallback:
        raw["model_downgrade"] = {"threshold_usd": threshold.removeprefix("$"), "fallback": fallback}
    elif threshold or fallback:
        missing = "model_downgrade.fallback" if threshold else "model_downgrade.threshold_usd"
        local.append(FieldViolation(missing, "give both the threshold and the fallback model, or neither"))
    shadow = values[SHADOW]
    if shadow == frozenset(RULE_KEYS):
        raw[SHADOW] = True
    elif shadow:
        raw[SHADOW] = sorted(shadow)
    try:
        config = parse_enforcement_config(raw)
    except InvalidArgument as exc:
        return None, errors_from([*local, *exc.violations])
    if local:
        return None, errors_from(local)
    return config, {}


def rules_of(config: EnforcementConfig) -> dict[str, Any]:
    """The user-facing form of a parsed config (what the service will store)."""
    return config_to_dict(config)


def rule_status(rules: Mapping[str, Any], key: str) -> str:
    """``off``, ``enforced`` or ``shadow`` (evaluated and reported, never blocking) for one rule."""
    if rules.get(key) is None:
        return "off"
    shadow = rules.get(SHADOW)
    if shadow is True or (isinstance(shadow, list) and key in shadow):
        return "shadow"
    return "enforced"
