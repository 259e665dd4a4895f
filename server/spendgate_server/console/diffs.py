"""Key-by-key diffs of user-facing configs, ready for a template (same lines as ``spendgate config``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spendgate_server.config_cli import diff_lines

__all__ = ["DiffLine", "diff"]

_KINDS = {"+": "added", "-": "removed", "~": "changed"}


@dataclass(frozen=True, slots=True)
class DiffLine:
    """One changed key: ``added``, ``removed`` or ``changed``, and the CLI's text for it."""

    kind: str
    text: str


def diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[DiffLine]:
    """What changed from ``before`` to ``after``, one line per key, sorted by key."""
    return [DiffLine(_KINDS[line[0]], line) for line in diff_lines(before, after)]
