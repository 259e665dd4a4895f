"""Violations: the live alerts feed (phase 2: ViolationService.WatchViolations over server-sent events)."""

from __future__ import annotations

from starlette.routing import Route

from spendgate_server.console.pages.placeholder import placeholder_page
from spendgate_server.console.web import NavItem

__all__ = ["NAV", "ROUTES"]

NAV = NavItem("Violations", "/violations")
ROUTES = [
    Route(
        NAV.path,
        placeholder_page(
            NAV,
            "The alerts feed, live and resuming from its cursor after a reconnect, filterable by "
            "policy type, project and session. A matched secret is never shown.",
            "ViolationService",
        ),
        methods=["GET"],
    )
]
