"""Violations: the alerts feed, newest first, filterable, live over server-sent events.

The newest page opens with the last day's violations grouped by policy and what broke it
(``violation_groups``): counts, sessions and a chart of when, one row per kind, instead of
a card per violation. Below it, the violations themselves as compact rows.

Without JavaScript the page is a paged list (ListViolations). With it, static/violations.js
opens ``/violations/stream`` (an EventSource) and puts each new violation at the top. The
stream relays WatchViolations: every event's id is the violation's cursor, so when the
connection drops the browser reconnects with ``Last-Event-ID`` and the watch resumes right
after the last violation it showed, missing none and repeating none. It starts from the
newest violation the page was rendered with, so nothing found in between is lost either.

A matched secret is never shown: the service keeps no matched text, and for a banned
pattern this page shows only the pattern, the offset and the service's redacted excerpt,
never a message of its own making.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import structlog
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from spendgate_server.console.backend import (
    Backend,
    BackendError,
    BackendUnavailable,
    InvalidInput,
    NotAuthorized,
)
from spendgate_server.console.sessions import ConsoleSession
from spendgate_server.console.violation_groups import (
    WINDOW_HOURS,
    WINDOW_LIMIT,
    ViolationSummary,
    group_of,
    summarize,
)
from spendgate_server.console.web import Console, NavItem, console_of, current_session, page, render
from spendgate_server.errors import InvalidArgument
from spendgate_server.policy.violations import PolicyType, Violation, ViolationFilter
from spendgate_server.rpc.validation import project_from_proto, session_id_from_proto

__all__ = ["NAV", "ROUTES", "TYPE_LABELS", "Filters", "read_filters"]

_log = structlog.get_logger("spendgate.console")

NAV = NavItem("Violations", "/violations")
PAGE_SIZE = 25
READ_PAGE_SIZE = 500  # the service's largest page: the summary reads its window in a few calls
# A comment line this often keeps proxies from closing an idle stream and notices a gone browser.
HEARTBEAT_SECONDS = 15.0
# The service checks a key when a watch starts: ending each stream after this long (the browser
# reconnects at once, resuming from its last event) makes a revoked key stop the feed within it.
STREAM_SECONDS = 300.0
RETRY_MILLIS = 3000
# Violations read ahead of a slow browser; beyond that the gRPC stream waits (flow control).
STREAM_BUFFER = 100
_CURSOR = re.compile(r"0|[0-9]{1,20}-[0-9]{1,20}")

TYPE_LABELS = {
    PolicyType.APPROVED_MODELS: "Unapproved model",
    PolicyType.BANNED_PATTERNS: "Banned pattern",
    PolicyType.KEY_ENVIRONMENT_CHECK: "Key outside its environments",
    PolicyType.APPROVAL_REQUIRED_THRESHOLD: "Costly call to review",
    PolicyType.SETTLE_ANOMALY: "Settle unlike its decision",
}
TYPE_CHOICES = tuple((t.key, TYPE_LABELS[t]) for t in PolicyType)


@dataclass(frozen=True, slots=True)
class Filters:
    """The feed's filters as the query string carries them (``type``, ``project``, ``session``)."""

    type: str = ""
    project: str = ""
    session: str = ""

    @property
    def active(self) -> bool:
        """Any filter set."""
        return bool(self.type or self.project or self.session)

    def where(self) -> ViolationFilter:
        """The service's filter (valid filters only: see ``read_filters``)."""
        return ViolationFilter(
            PolicyType.from_key(self.type) if self.type else None, self.session, self.project
        )

    def query(self, **extra: str) -> str:
        """The query string of these filters (and ``extra``), empty ones left out."""
        fields = {"type": self.type, "project": self.project, "session": self.session, **extra}
        return urlencode({k: v for k, v in fields.items() if v})

    def url(self, path: str = "/violations", **extra: str) -> str:
        """``path`` with these filters (and ``extra``) in its query string."""
        query = self.query(**extra)
        return f"{path}?{query}" if query else path

    def but(self, **changes: str) -> Filters:
        """These filters with some changed (links that narrow or widen the feed)."""
        return Filters(**{"type": self.type, "project": self.project, "session": self.session, **changes})


def read_filters(params: Mapping[str, str]) -> tuple[Filters, dict[str, list[str]]]:
    """The filters of a query string, and an error by field for each one the service could never match."""
    filters = Filters(
        params.get("type", "").strip(), params.get("project", "").strip(), params.get("session", "").strip()
    )
    errors: dict[str, list[str]] = {}
    if filters.type and filters.type not in {t.key for t in PolicyType}:
        errors["type"] = [f"{filters.type!r} is not a policy type"]
    try:
        project_from_proto(filters.project)
    except InvalidArgument as exc:
        errors["project"] = [v.description for v in exc.violations]
    if filters.session:
        try:
            session_id_from_proto(filters.session)
        except InvalidArgument as exc:
            errors["session"] = [v.description for v in exc.violations]
    return filters, errors


def item_context(filters: Filters) -> dict[str, Any]:
    """What ``_violation.html`` needs besides the violation itself."""
    return {
        "type_labels": TYPE_LABELS,
        "filters": filters,
        "banned": PolicyType.BANNED_PATTERNS,
        "group_of": group_of,
    }


async def _summary(backend: Backend, api_key: str, where: ViolationFilter, now_ms: int) -> ViolationSummary:
    """The window's violations (the newest WINDOW_LIMIT of them), grouped."""
    since_ms = now_ms - WINDOW_HOURS * 3600 * 1000
    found: list[Violation] = []
    token = ""
    while True:
        page = await backend.list_violations(api_key, where, READ_PAGE_SIZE, token, since_ms=since_ms)
        found += page.violations
        token = page.next_page_token
        if not token or len(found) >= WINDOW_LIMIT:
            break
    complete = not token and len(found) <= WINDOW_LIMIT
    return summarize(found[:WINDOW_LIMIT], since_ms, now_ms, complete=complete)


async def _feed_head(backend: Backend, api_key: str) -> str:
    """The cursor of the newest violation of any kind, or "0" (from the start) when the feed is empty."""
    newest = await backend.list_violations(api_key, ViolationFilter(), 1, "")
    return newest.violations[0].cursor if newest.violations else "0"


async def show(request: Request, session: ConsoleSession) -> Response:
    """GET /violations[?type=&project=&session=&page_token=]: one page of the feed, newest first."""
    filters, errors = read_filters(request.query_params)
    context: dict[str, Any] = {
        "title": "Violations",
        "filters": filters,
        "errors": errors,
        "type_choices": TYPE_CHOICES,
        "projects": console_of(request).projects,
        "violations": (),
        "stream_url": "",
        "older_url": "",
        "newest_url": "",
        "summary": None,
        "window_hours": WINDOW_HOURS,
        "window_limit": WINDOW_LIMIT,
        **item_context(filters),
    }
    if errors:
        return render(request, "violations.html", context, status_code=400, session=session)
    backend = console_of(request).backend
    token = request.query_params.get("page_token", "")
    try:
        found = await backend.list_violations(session.api_key, filters.where(), PAGE_SIZE, token)
    except InvalidInput:
        # A page token the service does not recognise (tokens are the service's, opaque here).
        not_found = {"title": "Not found", "message": "No such page of violations."}
        return render(request, "error.html", not_found, status_code=404, session=session)
    if not token:
        now_ms = console_of(request).wall_clock_ms()
        context["summary"] = await _summary(backend, session.api_key, filters.where(), now_ms)
        # Live from the newest violation shown: whatever is found from here on arrives by the stream.
        cursor = (
            found.violations[0].cursor if found.violations else await _feed_head(backend, session.api_key)
        )
        context["stream_url"] = filters.url("/violations/stream", cursor=cursor)
    else:
        context["newest_url"] = filters.url()
    if found.next_page_token:
        context["older_url"] = filters.url(page_token=found.next_page_token)
    context["violations"] = found.violations
    return render(request, "violations.html", context, session=session)


def _event(name: str, data: str, event_id: str = "") -> str:
    """One server-sent event; every line of ``data`` is a data field (the browser joins them)."""
    lines = [f"event: {name}"]
    if event_id:
        lines.append(f"id: {event_id}")
    lines += [f"data: {line}" for line in data.splitlines() or [""]]
    return "\n".join(lines) + "\n\n"


_END = object()


async def _events(
    console: Console, session: ConsoleSession, filters: Filters, cursor: str
) -> AsyncIterator[str]:
    """The stream's body: violations as HTML list items, keep-alive comments, and how it ended."""
    template = console.templates.get_template("_violation.html")
    extra = item_context(filters)
    queue: asyncio.Queue[object] = asyncio.Queue(STREAM_BUFFER)

    async def relay() -> None:
        watch = console.backend.watch_violations(session.api_key, filters.where(), cursor)
        try:
            async with contextlib.aclosing(watch):
                async for violation in watch:
                    await queue.put(violation)
            await queue.put(_END)
        except BackendError as exc:
            await queue.put(exc)
        except Exception as exc:
            # Never a silent stall: the feed ends and says so, and the log has the details.
            _log.error("console_feed_failed", key=session.key_label, exc_info=exc)
            await queue.put(BackendError("the console failed to relay the feed (see its log)"))

    reader = asyncio.ensure_future(relay())
    deadline = asyncio.get_running_loop().time() + STREAM_SECONDS
    try:
        yield f"retry: {RETRY_MILLIS}\n\n"
        while True:
            if console.sessions.peek(session.session_id) is None:
                yield _event("ended", "Your session ended: sign in again to follow the feed.")
                return
            timeout = min(HEARTBEAT_SECONDS, deadline - asyncio.get_running_loop().time())
            if timeout <= 0:
                return  # the browser reconnects from its last event id, and the key is checked anew
            try:
                item = await asyncio.wait_for(queue.get(), timeout)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if isinstance(item, Violation):
                html = template.render(v=item, **extra)
                yield _event("violation", html, event_id=item.cursor)
            elif isinstance(item, NotAuthorized):
                console.sessions.delete(session.session_id)
                yield _event("ended", "Your session ended: the service no longer accepts its key.")
                return
            elif isinstance(item, BackendUnavailable) or item is _END:
                # The service went away or closed the watch: the browser reconnects and resumes.
                return
            else:
                _log.warning("console_feed_refused", key=session.key_label, error=str(item))
                yield _event("ended", f"spendgate refused the live feed: {item}")
                return
    finally:
        reader.cancel()


async def stream(request: Request) -> Response:
    """GET /violations/stream: the live feed as text/event-stream, resuming after ``Last-Event-ID``.

    Refused with a plain 401 without a session (EventSource then stops; a redirect to the
    sign-in page would be meaningless to it). Watching is not activity: it never restarts
    the session's idle timer, and the stream ends when the session does.
    """
    session = current_session(request, touch=False)
    if session is None:
        return PlainTextResponse("sign in first\n", status_code=401, headers={"cache-control": "no-store"})
    filters, errors = read_filters(request.query_params)
    # The browser's Last-Event-ID (the cursor of the last violation it received) wins over the
    # cursor the page started from.
    cursor = request.headers.get("last-event-id", "").strip() or request.query_params.get("cursor", "")
    if errors or (cursor and not _CURSOR.fullmatch(cursor)):
        return PlainTextResponse(
            "bad filter or cursor\n", status_code=400, headers={"cache-control": "no-store"}
        )
    return StreamingResponse(
        _events(console_of(request), session, filters, cursor),
        media_type="text/event-stream",
        headers={"cache-control": "no-store", "x-accel-buffering": "no"},
    )


ROUTES = [
    Route("/violations", page(show), methods=["GET"]),
    Route("/violations/stream", stream, methods=["GET"]),
]
