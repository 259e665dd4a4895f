"""Policies: the four org-wide policy types, edited like the rules (phase 2: PolicyService)."""

from __future__ import annotations

from starlette.routing import Route

from spendgate_server.console.pages.placeholder import placeholder_page
from spendgate_server.console.web import NavItem

__all__ = ["NAV", "ROUTES"]

NAV = NavItem("Policies", "/policies")
ROUTES = [
    Route(
        NAV.path,
        placeholder_page(
            NAV,
            "The four org-wide policies (approved models, banned patterns, key environments and the "
            "approval threshold), edited like the rules, with history and diffs; an invalid pattern "
            "is refused with RE2's message.",
            "PolicyService",
        ),
        methods=["GET"],
    )
]
