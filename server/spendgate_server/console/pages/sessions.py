"""Sessions: the sessions spending the most right now, each with its budget, blocks and spend over time.

Read from SessionService, which aggregates what every server saw about once a second:
the figures trail the decisions by that much. Budget use is a ``<meter>`` with its
figures in words beside it; spend over time is a small inline SVG bar chart drawn here
(charts.py, no chart library), with a summary sentence and a table of the minutes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from spendgate_server.console.charts import SpendChart, spend_chart
from spendgate_server.console.rules_form import RULE_SECTIONS
from spendgate_server.console.sessions import ConsoleSession
from spendgate_server.console.web import NavItem, console_of, page, render
from spendgate_server.engine.config import Rule
from spendgate_server.errors import InvalidArgument
from spendgate_server.money import format_usd
from spendgate_server.rpc.validation import project_from_proto
from spendgate_server.store.insights import SessionSummary

__all__ = ["NAV", "ROUTES", "SessionCard", "session_card"]

NAV = NavItem("Sessions", "/sessions")
PAGE_SIZE = 20
# Budget use from which the bar turns amber, then red (the words say it too).
HIGH_PERCENT, FULL_PERCENT = 80, 100
RULE_TITLES = {section.key: section.title for section in RULE_SECTIONS}


@dataclass(frozen=True, slots=True)
class SessionCard:
    """One session as the page shows it."""

    summary: SessionSummary
    # Spend as a share of the budget (None without a budget); may pass 100 in crossing mode.
    budget_percent: int | None
    budget_text: str
    blocked: tuple[tuple[str, str, int], ...]
    blocked_total: int
    chart: SpendChart | None


def _budget(summary: SessionSummary) -> tuple[int | None, str]:
    spend, budget = summary.spend_nano_usd, summary.budget_nano_usd
    if budget is None:
        return None, f"{format_usd(spend)} spent, no session budget"
    if budget == 0:
        return 100, f"{format_usd(spend)} spent of a $0 budget: every call is blocked"
    percent = spend * 100 // budget
    text = f"{format_usd(spend)} of {format_usd(budget)} ({percent}%)"
    if spend > budget:
        text += f", over by {format_usd(spend - budget)}"
    return percent, text


def session_card(summary: SessionSummary, chart: SpendChart | None) -> SessionCard:
    """The figures of one session, worded for people."""
    percent, text = _budget(summary)
    blocked = tuple(
        (RULE_TITLES.get(rule.key, rule.key), rule.key, count)
        for rule, count in sorted(summary.blocked.items(), key=lambda item: (-item[1], item[0]))
        if count and isinstance(rule, Rule)
    )
    return SessionCard(summary, percent, text, blocked, sum(c for _, _, c in blocked), chart)


async def show(request: Request, session: ConsoleSession) -> Response:
    """GET /sessions[?project=P]: the top sessions by spend, highest first."""
    console = console_of(request)
    project = request.query_params.get("project", "").strip()
    context = {
        "title": "Sessions",
        "project": project,
        "projects": console.projects,
        "project_error": "",
        "cards": (),
        "high_percent": HIGH_PERCENT,
        "full_percent": FULL_PERCENT,
    }
    try:
        project_from_proto(project)
    except InvalidArgument as exc:
        context["project_error"] = " ".join(v.description for v in exc.violations)
        return render(request, "sessions.html", context, status_code=400, session=session)
    backend = console.backend
    summaries = await backend.list_sessions(session.api_key, project, PAGE_SIZE)
    series = await asyncio.gather(
        *(backend.get_session_spend(session.api_key, s.session_id) for s in summaries)
    )
    context["cards"] = tuple(
        session_card(s, spend_chart(points, s.last_seen_ms))
        for s, points in zip(summaries, series, strict=True)
    )
    return render(request, "sessions.html", context, session=session)


ROUTES = [Route("/sessions", page(show), methods=["GET"])]
