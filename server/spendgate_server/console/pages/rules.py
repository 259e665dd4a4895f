"""Rules: the tenant's enforcement config and each project's, edited in a form, with history.

Every save is the service's compare-and-set on the etag the form was loaded with. When
someone else saved first, nothing is written: the page shows what they changed and how
the edit differs from what is stored now, and keeps the edit in the form so that
replacing their version is a deliberate second save.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

import structlog
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from spendgate_server.console.backend import ConfigView, EditConflict, InvalidInput, RevisionPage
from spendgate_server.console.diffs import DiffLine, diff
from spendgate_server.console.pages._documents import conflict_diffs, form_base, history_lines
from spendgate_server.console.rules_form import (
    RULE_SECTIONS,
    FormErrors,
    errors_from,
    form_values,
    parse_rules_form,
    rule_status,
    rules_of,
    submitted_values,
)
from spendgate_server.console.sessions import ConsoleSession
from spendgate_server.console.web import FormRefused, NavItem, console_of, page, read_form, render
from spendgate_server.errors import InvalidArgument
from spendgate_server.rpc.validation import project_from_proto

__all__ = ["NAV", "ROUTES"]

_log = structlog.get_logger("spendgate.console")

NAV = NavItem("Rules", "/rules")
RECENT_CHANGES = 5
HISTORY_PAGE_SIZE = 20
# How far back a conflict looks for the version the editor started from.
CONFLICT_LOOKBACK = 50
PROJECT_BOUND = "1-64 characters of letters, digits, '.', '_' or '-'"
# Where the error summary's links lead, and what they call each field.
FIELD_IDS = {
    **{f.name: f.html_id for s in RULE_SECTIONS for f in s.fields},
    **{s.choice.name: f"f-{s.choice.name}" for s in RULE_SECTIONS if s.choice},
    "shadow": RULE_SECTIONS[0].shadow_id,
}
FIELD_LABELS = {
    **{f.name: f"{s.title}, {f.label[0].lower()}{f.label[1:]}" for s in RULE_SECTIONS for f in s.fields},
    **{
        s.choice.name: f"{s.title}, {s.choice.label[0].lower()}{s.choice.label[1:]}"
        for s in RULE_SECTIONS
        if s.choice
    },
    "shadow": "Shadow mode",
}


def _first(form: Mapping[str, Sequence[str]], name: str) -> str:
    return (form.get(name) or [""])[0]


def _project_error(project: str) -> str:
    try:
        project_from_proto(project)  # the service's rule, worded for the page
    except InvalidArgument:
        return f"A project name is {PROJECT_BOUND}."
    return ""


def rules_url(project: str, **extra: str) -> str:
    """The Rules page of the tenant (project '') or of a project."""
    query = {**({"project": project} if project else {}), **extra}
    return "/rules" + (f"?{urlencode(query)}" if query else "")


def _history(page: RevisionPage) -> list[tuple[ConfigView, list[DiffLine]]]:
    return history_lines(page, _rules, diff)


def _rules(view: ConfigView) -> dict[str, Any]:
    return view.rules


def _editor(
    request: Request,
    session: ConsoleSession,
    *,
    project: str,
    stored: ConfigView,
    history: RevisionPage,
    values: dict[str, Any],
    errors: FormErrors | None = None,
    etag: str,
    base_version: int,
    conflict: dict[str, Any] | None = None,
    status_code: int = 200,
) -> Response:
    errors = errors or {}
    order = [f.name for s in RULE_SECTIONS for f in s.fields] + [
        s.choice.name for s in RULE_SECTIONS if s.choice
    ]
    context = {
        "title": f"Rules: project {project}" if project else "Rules: tenant",
        "project": project,
        "projects": console_of(request).projects,
        "project_error": "",
        "stored": stored,
        "statuses": {s.key: rule_status(stored.rules, s.key) for s in RULE_SECTIONS},
        "sections": RULE_SECTIONS,
        "values": values,
        "errors": errors,
        "first_error": next((name for name in order if name in errors), ""),
        "ids": FIELD_IDS,
        "labels": FIELD_LABELS,
        "etag": etag,
        "base_version": base_version,
        "conflict": conflict,
        "saved": request.query_params.get("saved", ""),
        "history": _history(history),
        "more_history": bool(history.next_page_token),
        "rules_url": rules_url,
    }
    return render(request, "rules.html", context, status_code=status_code, session=session)


async def show(request: Request, session: ConsoleSession) -> Response:
    """GET /rules[?project=P]: the config in its edit form, and its recent changes."""
    project = request.query_params.get("project", "").strip()
    if problem := _project_error(project):
        context = {
            "title": "Rules",
            "project": project,
            "projects": console_of(request).projects,
            "project_error": problem,
            "rules_url": rules_url,
        }
        return render(request, "rules_project_error.html", context, status_code=400, session=session)
    backend = console_of(request).backend
    stored = await backend.get_config(session.api_key, project)
    history = await backend.list_revisions(session.api_key, project, RECENT_CHANGES, "")
    return _editor(
        request,
        session,
        project=project,
        stored=stored,
        history=history,
        values=form_values(stored.rules),
        etag=stored.etag,
        base_version=stored.version,
    )


async def save(request: Request, session: ConsoleSession) -> Response:
    """POST /rules: validate, then compare-and-set; field errors, a conflict, or back to the page."""
    form = await read_form(request, session.csrf_token)
    project = _first(form, "project")
    if _project_error(project):
        raise FormRefused("the form names an invalid project")
    etag, base_version = form_base(form)
    backend = console_of(request).backend
    config, errors = parse_rules_form(form)
    if config is not None:
        try:
            written = await backend.update_config(session.api_key, project, config, etag)
        except InvalidInput as exc:
            errors = errors_from(exc.violations) or {"": [str(exc)]}
        except EditConflict:
            return await _conflict(request, session, project, form, rules_of(config), base_version)
        else:
            _log.info("console_config_saved", key=session.key_label, project=project, version=written.version)
            return RedirectResponse(rules_url(project, saved=str(written.version)), status_code=303)
    stored = await backend.get_config(session.api_key, project)
    history = await backend.list_revisions(session.api_key, project, RECENT_CHANGES, "")
    return _editor(
        request,
        session,
        project=project,
        stored=stored,
        history=history,
        values=submitted_values(form),
        errors=errors,
        # The etag the edit started from: saving the corrected form still detects a conflict.
        etag=etag,
        base_version=base_version,
        status_code=422,
    )


async def _conflict(
    request: Request,
    session: ConsoleSession,
    project: str,
    form: Mapping[str, Sequence[str]],
    mine: dict[str, Any],
    base_version: int,
) -> Response:
    backend = console_of(request).backend
    stored = await backend.get_config(session.api_key, project)
    lookback = await backend.list_revisions(session.api_key, project, CONFLICT_LOOKBACK, "")
    _log.info("console_config_conflict", key=session.key_label, project=project, stored=stored.version)
    conflict = conflict_diffs(lookback, base_version, stored.rules, mine, _rules, diff)
    recent = await backend.list_revisions(session.api_key, project, RECENT_CHANGES, "")
    return _editor(
        request,
        session,
        project=project,
        stored=stored,
        history=recent,
        values=submitted_values(form),
        # Saving again now replaces what is stored: a decision made with both diffs in view.
        etag=stored.etag,
        base_version=stored.version,
        conflict=conflict,
        status_code=409,
    )


async def history(request: Request, session: ConsoleSession) -> Response:
    """GET /rules/history[?project=P&page_token=T]: every change, newest first, with its diff."""
    project = request.query_params.get("project", "").strip()
    token = request.query_params.get("page_token", "")
    not_found = {"title": "Not found", "message": "No such project or history page."}
    if _project_error(project):
        return render(request, "error.html", not_found, status_code=404, session=session)
    backend = console_of(request).backend
    try:
        revisions = await backend.list_revisions(session.api_key, project, HISTORY_PAGE_SIZE, token)
    except InvalidInput:
        # A page token the service does not recognise (tokens are the service's, opaque here).
        return render(request, "error.html", not_found, status_code=404, session=session)
    next_url = ""
    if revisions.next_page_token:
        query = {**({"project": project} if project else {}), "page_token": revisions.next_page_token}
        next_url = "/rules/history?" + urlencode(query)
    context = {
        "title": f"History: project {project}" if project else "History: tenant",
        "project": project,
        "history": _history(revisions),
        "next_url": next_url,
        "rules_url": rules_url,
    }
    return render(request, "rules_history.html", context, session=session)


ROUTES = [
    Route("/rules", page(show), methods=["GET"]),
    Route("/rules", page(save), methods=["POST"]),
    Route("/rules/history", page(history), methods=["GET"]),
]
