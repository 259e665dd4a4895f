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
from spendgate_server.engine.rules import RULE_UNITS, SESSION_BUDGET, FormChoice
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
    """A rule's fieldset: its key (also its shadow checkbox value), title, inputs and select."""

    key: str
    title: str
    summary: str
    fields: tuple[TextField, ...]
    choice: FormChoice | None = None
    # Shown when only some inputs of one nested mapping are given.
    all_or_none: str = ""

    @property
    def shadow_id(self) -> str:
        """The id of this rule's shadow checkbox."""
        return f"f-shadow-{self.key}"


# One fieldset per rule, in the rules' table order, from each rule's unit.
RULE_SECTIONS = tuple(
    RuleSection(
        unit.key,
        unit.title,
        unit.summary,
        tuple(TextField(f.name, f.label, f.hint, f.inputmode, f.kind) for f in unit.form_inputs),
        unit.form_choice,
        unit.form_all_or_none,
    )
    for unit in RULE_UNITS
)
RULE_KEYS = tuple(section.key for section in RULE_SECTIONS)
_CHOICES = tuple(section.choice for section in RULE_SECTIONS if section.choice is not None)
BUDGET_MODES = SESSION_BUDGET.form_choice.options if SESSION_BUDGET.form_choice else ()

# Service field paths (wire names, google.rpc.BadRequest) → the form field they concern.
_WIRE_FIELDS = {
    **{f"enforcement_config.{wire}": key for unit in RULE_UNITS for wire, key in unit.wire_fields},
    "enforcement_config.shadow": SHADOW,
    "project": "project",
}
_TEXT_FIELDS = tuple(f for s in RULE_SECTIONS for f in s.fields)
# A nested mapping's key (a parser error names it) → its first input.
_NESTED_FIRST: dict[str, str] = {}
for _field in _TEXT_FIELDS:
    if "." in _field.name:
        _NESTED_FIRST.setdefault(_field.name.rpartition(".")[0], _field.name)
_FORM_FIELDS = frozenset({f.name for f in _TEXT_FIELDS} | {c.name for c in _CHOICES} | {SHADOW, "project"})

FormErrors = dict[str, list[str]]
"""Error messages by form field name; '' holds those that concern no one field."""


def field_for_violation(field: str) -> str:
    """The form field a violation names, from the parser's keys or the service's wire paths."""
    if field in _FORM_FIELDS:
        return field
    if field.startswith("enforcement_config.shadow_rules"):
        return SHADOW
    if field in _NESTED_FIRST:
        return _NESTED_FIRST[field]
    return _WIRE_FIELDS.get(field, "")


def errors_from(violations: Sequence[FieldViolation]) -> FormErrors:
    """Group violations by the form field they concern."""
    errors: FormErrors = {}
    for violation in violations:
        errors.setdefault(field_for_violation(violation.field), []).append(violation.description)
    return errors


def _lookup(rules: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted key path (``model_downgrade.fallback``), or None."""
    value: Any = rules
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def form_values(rules: Mapping[str, Any]) -> dict[str, Any]:
    """The form's values for a config in its user-facing form (``config_to_dict``'s output)."""
    values: dict[str, Any] = {}
    for text_field in _TEXT_FIELDS:
        value = _lookup(rules, text_field.name)
        values[text_field.name] = "" if value is None else str(value)
    for choice in _CHOICES:
        values[choice.name] = str(rules.get(choice.name, choice.default))
    shadow = rules.get(SHADOW)
    values[SHADOW] = frozenset(RULE_KEYS) if shadow is True else frozenset(shadow or ())
    return values


def submitted_values(form: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The values as typed, to show the form again after an error or a conflict."""
    values: dict[str, Any] = {
        name: (form.get(name) or [""])[0].strip() for name in _FORM_FIELDS - {SHADOW, "project"}
    }
    for choice in _CHOICES:
        values[choice.name] = values[choice.name] or choice.default
    values[SHADOW] = frozenset(form.get(SHADOW) or ())
    return values


def parse_rules_form(form: Mapping[str, Sequence[str]]) -> tuple[EnforcementConfig | None, FormErrors]:
    """Build the config a submitted form describes.

    Inputs whose names share a parent (``model_downgrade.threshold_usd`` and
    ``model_downgrade.fallback``) fill one mapping: give all of them or none.

    Returns:
        The config, or None with the errors by field when any field is bad.
    """
    values = submitted_values(form)
    local: list[FieldViolation] = []
    raw: dict[str, Any] = {}
    for section in RULE_SECTIONS:
        nested: dict[str, dict[str, str]] = {}
        for text_field in section.fields:
            text = values[text_field.name]
            if text_field.inputmode == "decimal":
                text = text.removeprefix("$")
            parent, dot, child = text_field.name.rpartition(".")
            if dot:
                nested.setdefault(parent, {})[child] = text
                continue
            if not text:
                continue
            if text_field.kind == "int":
                if not _INTEGER.fullmatch(text):
                    local.append(FieldViolation(text_field.name, f"must be a whole number, got {text!r}"))
                    continue
                raw[text_field.name] = int(text)
            else:
                raw[text_field.name] = text
        for parent, parts in nested.items():
            given = {name: text for name, text in parts.items() if text}
            if len(given) == len(parts):
                raw[parent] = given
            elif given:
                missing = next(name for name, text in parts.items() if not text)
                local.append(FieldViolation(f"{parent}.{missing}", section.all_or_none))
        if section.choice is not None and values[section.choice.name] != section.choice.default:
            raw[section.choice.name] = values[section.choice.name]
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
