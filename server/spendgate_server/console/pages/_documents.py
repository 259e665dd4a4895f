"""What the Rules and Policies pages do alike: a versioned document edited in a form.

Both save with the service's compare-and-set on the etag the form was loaded with,
show each revision with its diff against the one before, and on a conflict show what
the other writer changed and how the edit differs from what is stored now. A page
passes ``contents`` (a revision's user-facing mapping) and ``differ`` (how two
mappings compare, one line per change).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from spendgate_server.console.diffs import DiffLine

__all__ = ["Differ", "PageOf", "conflict_diffs", "form_base", "history_lines"]

Differ = Callable[[Mapping[str, Any], Mapping[str, Any]], list[DiffLine]]


class _Revision(Protocol):
    @property
    def version(self) -> int: ...


_V = TypeVar("_V", bound=_Revision)
_V_co = TypeVar("_V_co", bound=_Revision, covariant=True)


class PageOf(Protocol[_V_co]):
    """A page of revisions, newest first, and the revision just before its last one."""

    @property
    def revisions(self) -> tuple[_V_co, ...]: ...

    @property
    def older(self) -> _V_co | None: ...


def form_base(form: Mapping[str, Sequence[str]]) -> tuple[str, int]:
    """The etag and version the edit started from (version 0 when the field is not a small number)."""
    etag = (form.get("etag") or [""])[0]
    base = (form.get("base_version") or [""])[0]
    return etag, int(base) if base.isascii() and base.isdigit() and len(base) < 19 else 0


def history_lines(
    page: PageOf[_V], contents: Callable[[_V], dict[str, Any]], differ: Differ
) -> list[tuple[_V, list[DiffLine]]]:
    """Each revision with its diff against the one before it (the first one against nothing)."""
    olders: list[_V | None] = [*page.revisions[1:], page.older][: len(page.revisions)]
    return [
        (revision, differ(contents(older) if older else {}, contents(revision)))
        for revision, older in zip(page.revisions, olders, strict=True)
    ]


def conflict_diffs(
    lookback: PageOf[_V],
    base_version: int,
    stored: dict[str, Any],
    mine: dict[str, Any],
    contents: Callable[[_V], dict[str, Any]],
    differ: Differ,
) -> dict[str, Any]:
    """``theirs``: what was saved since ``base_version`` (None when it is past ``lookback``);
    ``mine``: how the edit differs from ``stored``."""
    base: dict[str, Any] | None = {} if base_version == 0 else None
    for revision in lookback.revisions:
        if revision.version == base_version:
            base = contents(revision)
    return {
        "theirs": differ(base, stored) if base is not None else None,
        "mine": differ(stored, mine),
    }
