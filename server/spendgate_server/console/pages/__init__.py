"""The console's pages, one module each; the navigation bar lists them in this order."""

from __future__ import annotations

from starlette.routing import BaseRoute

from spendgate_server.console.pages import policies, rules, sessions, signin, violations
from spendgate_server.console.web import NavItem

__all__ = ["NAV", "ROUTES"]

_PAGES = (rules, policies, violations, sessions)
NAV: tuple[NavItem, ...] = tuple(module.NAV for module in _PAGES)
ROUTES: list[BaseRoute] = [*signin.ROUTES, *(route for module in _PAGES for route in module.ROUTES)]
