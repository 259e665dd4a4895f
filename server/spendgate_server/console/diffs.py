"""Key-by-key diffs of user-facing configs and policies, ready for a template.

Rules diff like ``spendgate config`` prints them. Policies diff item by item (a model,
a pattern by its id, a key by its name), so adding one pattern to twenty reads as one
added line rather than two twenty-item lists.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spendgate_server.admin.documents_cli import diff_lines

__all__ = ["DiffLine", "diff", "policy_diff"]

_KINDS = {"+": "added", "-": "removed", "~": "changed"}


@dataclass(frozen=True, slots=True)
class DiffLine:
    """One changed key: ``added``, ``removed`` or ``changed``, and the CLI's text for it."""

    kind: str
    text: str


def diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[DiffLine]:
    """What changed from ``before`` to ``after``, one line per key, sorted by key."""
    return [DiffLine(_KINDS[line[0]], line) for line in diff_lines(before, after)]


def _items(policies: Mapping[str, Any]) -> dict[str, Any]:
    """Policies flattened to one entry per model, pattern, key and scalar policy."""
    items: dict[str, Any] = {}
    for model in policies.get("approved_models") or ():
        items[f"approved_models[{json.dumps(model)}]"] = True
    for banned in policies.get("banned_patterns") or ():
        items[f"banned_patterns[{banned['id']}]"] = banned["pattern"]
    for rule in policies.get("key_environment_check") or ():
        name = (
            f"label {rule['key_label']}"
            if rule.get("key_label")
            else f"fingerprint {rule['key_fingerprint']}"
        )
        items[f"key_environment_check[{name}]"] = rule["environments"]
    for key in ("approval_required_threshold_cents", "journal_prompts"):
        if key in policies:
            items[key] = policies[key]
    return items


def policy_diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[DiffLine]:
    """What changed from ``before`` to ``after`` (``policies_to_dict`` forms), one line per item."""
    lines = []
    for line in diff_lines(_items(before), _items(after)):
        # A model is all key: "+ approved_models["x"]: true" reads better without the value.
        text = line.removesuffix(": true") if line[2:].startswith("approved_models[") else line
        lines.append(DiffLine(_KINDS[line[0]], text))
    return lines
