"""A page whose service API does not exist yet: it says what it will show, and behind what."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from spendgate_server.console.sessions import ConsoleSession
from spendgate_server.console.web import NavItem, page, render

__all__ = ["placeholder_page"]


def placeholder_page(nav: NavItem, summary: str, needs: str) -> Callable[[Request], Awaitable[Response]]:
    """A signed-in page titled ``nav.title`` that describes itself until ``needs`` is served."""

    async def show(request: Request, session: ConsoleSession) -> Response:
        context = {"title": nav.title, "summary": summary, "needs": needs}
        return render(request, "placeholder.html", context, session=session)

    return page(show)
