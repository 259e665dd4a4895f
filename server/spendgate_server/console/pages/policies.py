"""Policies: the tenant's four org-wide policy types edited in one form, with history.

Policies never block a call; a settled call that breaks one is flagged on the Violations
page. Saving works like the Rules page: the service's compare-and-set on the etag the
form was loaded with; its field violations (RE2's reason for a bad pattern) are shown
beside the row they name; and when someone else saved first nothing is written, the page
shows both diffs and keeps the edit, so replacing their version is a deliberate second
save.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import structlog
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from spendgate_server.console.backend import EditConflict, InvalidInput, PolicyRevisionPage, PolicyView
from spendgate_server.console.diffs import DiffLine, policy_diff
from spendgate_server.console.pages._documents import conflict_diffs, form_base, history_lines
from spendgate_server.console.policies_form import (
    KEY_KINDS,
    FormErrors,
    PolicyValues,
    errors_from,
    form_values,
    parse_policies_form,
    policy_status,
)
from spendgate_server.console.sessions import ConsoleSession
from spendgate_server.console.web import NavItem, console_of, page, read_form, render
from spendgate_server.policy.policies import policies_to_dict

__all__ = ["NAV", "POLICY_SECTIONS", "ROUTES"]

_log = structlog.get_logger("spendgate.console")

NAV = NavItem("Policies", "/policies")
RECENT_CHANGES = 5
HISTORY_PAGE_SIZE = 20
# How far back a conflict looks for the version the editor started from.
CONFLICT_LOOKBACK = 50


@dataclass(frozen=True, slots=True)
class PolicySection:
    """One policy type's fieldset: its key (as in policies files and violations), title and summary."""

    key: str
    title: str
    summary: str


POLICY_SECTIONS = (
    PolicySection(
        "approved_models",
        "Approved models",
        "Flag a call whose model (the one that ran, after any downgrade) is not listed.",
    ),
    PolicySection(
        "banned_patterns",
        "Banned patterns",
        "Flag a prompt that matches a regular expression (RE2 syntax: no backreferences or "
        "look-around). The feed shows the pattern and where it matched, never the matched text.",
    ),
    PolicySection(
        "key_environment_check",
        "Key environments",
        "Flag a provider key used outside the environments listed for it (the client's "
        "SPENDGATE_ENVIRONMENT), or with no environment reported.",
    ),
    PolicySection(
        "approval_required_threshold_cents",
        "Approval threshold",
        "Flag one call that cost more than this for review.",
    ),
)


def _labels(values: PolicyValues) -> dict[str, str]:
    """What the error summary calls each field it links to."""
    labels = {
        "approved_models": "Approved models",
        "banned_patterns": "Banned patterns",
        "key_environment_check": "Key environments",
        "approval_required_threshold_cents": "Approval threshold",
        "journal_prompts": "Journal prompt text",
    }
    for i in range(len(values.patterns)):
        labels[f"banned_patterns[{i}].id"] = f"Banned pattern {i + 1}, id"
        labels[f"banned_patterns[{i}].pattern"] = f"Banned pattern {i + 1}, pattern"
    for i in range(len(values.keys)):
        labels[f"key_environment_check[{i}].key"] = f"Key {i + 1}"
        labels[f"key_environment_check[{i}].environments"] = f"Key {i + 1}, environments"
    return labels


def html_id(name: str) -> str:
    """The id of a form field: no brackets or dots, so it needs no escaping in CSS or fragment links."""
    return "f-" + name.replace("[", "-").replace("].", "-").replace("]", "").replace(".", "-")


def _history(page: PolicyRevisionPage) -> list[tuple[PolicyView, list[DiffLine]]]:
    return history_lines(page, _policies, policy_diff)


def _policies(view: PolicyView) -> dict[str, Any]:
    return view.policies


def _editor(
    request: Request,
    session: ConsoleSession,
    *,
    stored: PolicyView,
    history: PolicyRevisionPage,
    values: PolicyValues,
    errors: FormErrors | None = None,
    etag: str,
    base_version: int,
    conflict: dict[str, Any] | None = None,
    status_code: int = 200,
) -> Response:
    errors = errors or {}
    labels = _labels(values)
    order = [
        "approved_models",
        *(f"banned_patterns[{i}].{f}" for i in range(len(values.patterns)) for f in ("id", "pattern")),
        *(
            f"key_environment_check[{i}].{f}"
            for i in range(len(values.keys))
            for f in ("key", "environments")
        ),
        "approval_required_threshold_cents",
    ]
    context = {
        "title": "Policies",
        "stored": stored,
        "statuses": {s.key: policy_status(stored.policies, s.key) for s in POLICY_SECTIONS},
        "sections": {s.key: s for s in POLICY_SECTIONS},
        "key_kinds": KEY_KINDS,
        "values": values,
        "errors": errors,
        "first_error": next((name for name in order if name in errors), ""),
        "labels": labels,
        "html_id": html_id,
        "etag": etag,
        "base_version": base_version,
        "conflict": conflict,
        "saved": request.query_params.get("saved", ""),
        "history": _history(history),
        "more_history": bool(history.next_page_token),
    }
    return render(request, "policies.html", context, status_code=status_code, session=session)


async def show(request: Request, session: ConsoleSession) -> Response:
    """GET /policies: the policies in their edit form, and their recent changes."""
    backend = console_of(request).backend
    stored = await backend.get_policies(session.api_key)
    history = await backend.list_policy_revisions(session.api_key, RECENT_CHANGES, "")
    return _editor(
        request,
        session,
        stored=stored,
        history=history,
        values=form_values(stored.policies),
        etag=stored.etag,
        base_version=stored.version,
    )


async def save(request: Request, session: ConsoleSession) -> Response:
    """POST /policies: compare-and-set; field errors from the service, a conflict, or back to the page."""
    form = await read_form(request, session.csrf_token)
    etag, base_version = form_base(form)
    backend = console_of(request).backend
    parsed = parse_policies_form(form)
    errors = parsed.errors
    if parsed.policies is not None:
        try:
            written = await backend.update_policies(session.api_key, parsed.policies, etag)
        except InvalidInput as exc:
            errors = errors_from(exc.violations, parsed) or {"": [str(exc)]}
        except EditConflict:
            mine = policies_to_dict(parsed.policies)
            return await _conflict(request, session, parsed.values, mine, base_version)
        else:
            _log.info("console_policies_saved", key=session.key_label, version=written.version)
            return RedirectResponse("/policies?" + urlencode({"saved": written.version}), status_code=303)
    stored = await backend.get_policies(session.api_key)
    history = await backend.list_policy_revisions(session.api_key, RECENT_CHANGES, "")
    return _editor(
        request,
        session,
        stored=stored,
        history=history,
        # As typed, rows in their places (errors name them), with room for more.
        values=parsed.values.with_blank_rows(),
        errors=errors,
        # The etag the edit started from: saving the corrected form still detects a conflict.
        etag=etag,
        base_version=base_version,
        status_code=422,
    )


async def _conflict(
    request: Request,
    session: ConsoleSession,
    values: PolicyValues,
    mine: dict[str, Any],
    base_version: int,
) -> Response:
    backend = console_of(request).backend
    stored = await backend.get_policies(session.api_key)
    lookback = await backend.list_policy_revisions(session.api_key, CONFLICT_LOOKBACK, "")
    _log.info("console_policies_conflict", key=session.key_label, stored=stored.version)
    conflict = conflict_diffs(lookback, base_version, stored.policies, mine, _policies, policy_diff)
    recent = await backend.list_policy_revisions(session.api_key, RECENT_CHANGES, "")
    return _editor(
        request,
        session,
        stored=stored,
        history=recent,
        values=values.with_blank_rows(),
        # Saving again now replaces what is stored: a decision made with both diffs in view.
        etag=stored.etag,
        base_version=stored.version,
        conflict=conflict,
        status_code=409,
    )


async def history(request: Request, session: ConsoleSession) -> Response:
    """GET /policies/history[?page_token=T]: every change, newest first, with its diff."""
    token = request.query_params.get("page_token", "")
    backend = console_of(request).backend
    try:
        revisions = await backend.list_policy_revisions(session.api_key, HISTORY_PAGE_SIZE, token)
    except InvalidInput:
        # A page token the service does not recognise (tokens are the service's, opaque here).
        not_found = {"title": "Not found", "message": "No such history page."}
        return render(request, "error.html", not_found, status_code=404, session=session)
    next_url = ""
    if revisions.next_page_token:
        next_url = "/policies/history?" + urlencode({"page_token": revisions.next_page_token})
    context = {
        "title": "Policy history",
        "history": _history(revisions),
        "next_url": next_url,
    }
    return render(request, "policies_history.html", context, session=session)


ROUTES = [
    Route("/policies", page(show), methods=["GET"]),
    Route("/policies", page(save), methods=["POST"]),
    Route("/policies/history", page(history), methods=["GET"]),
]
