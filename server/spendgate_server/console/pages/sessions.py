"""Sessions: the sessions spending most right now (phase 2: needs a session listing call)."""

from __future__ import annotations

from starlette.routing import Route

from spendgate_server.console.pages.placeholder import placeholder_page
from spendgate_server.console.web import NavItem

__all__ = ["NAV", "ROUTES"]

NAV = NavItem("Sessions", "/sessions")
ROUTES = [
    Route(
        NAV.path,
        placeholder_page(
            NAV,
            "The sessions with the most spend right now: budget use as a bar, blocked calls by rule "
            "and a small spend-over-time chart.",
            "a session listing call (not in the spendgate.v1 contract yet)",
        ),
        methods=["GET"],
    )
]
