"""What every page shares: the signed-in session, CSRF-checked forms, rendering, security headers.

Defences, in the order a request meets them:

1. ``SecurityHeaders`` (ASGI middleware): a request whose Host header is not one of the
   console's own origins is refused (DNS rebinding), and every response carries a strict
   Content-Security-Policy (no inline script or style, nothing from another origin),
   ``frame-ancestors 'none'``, ``nosniff`` and ``Referrer-Policy: same-origin``.
2. The session cookie is HttpOnly, ``SameSite=Strict`` and, when browsers reach the
   console over HTTPS, ``Secure`` with the ``__Host-`` prefix: another site's form post
   arrives without it.
3. ``read_form``: every POST must come from one of the console's own origins (``Origin``,
   else ``Referer``; ``Sec-Fetch-Site`` when the browser sends it) and carry the session's
   CSRF token (sign-in, which has no session yet, uses a double-submit cookie instead).
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import jinja2
import structlog
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from spendgate_server.console.backend import Backend, BackendError, BackendUnavailable, NotAuthorized
from spendgate_server.console.sessions import ConsoleSession, SessionStore
from spendgate_server.console.throttle import SignInThrottle
from spendgate_server.money import format_usd

__all__ = [
    "Console",
    "FormRefused",
    "NavItem",
    "SecurityHeaders",
    "console_of",
    "current_session",
    "new_signin_token",
    "page",
    "read_form",
    "render",
    "safe_next",
]

_log = structlog.get_logger("spendgate.console")

# The largest policy set the service accepts (100 patterns of 1 KiB, 200 keys with 16
# environments each, 200 models), url-encoded, fits; nothing bigger is read.
MAX_FORM_BYTES = 1024 * 1024
MAX_FORM_FIELDS = 2000
CSP = (
    "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


@dataclass(frozen=True, slots=True)
class NavItem:
    """One entry of the navigation bar: a page module's title and path."""

    title: str
    path: str


@dataclass(slots=True)
class Console:
    """The console's per-process state: the service client and the signed-in sessions, nothing else."""

    backend_factory: Callable[[], Backend]
    sessions: SessionStore
    allowed_origins: frozenset[str]
    secure_cookies: bool
    target: str
    projects: tuple[str, ...] = ()
    nav: tuple[NavItem, ...] = ()
    # Failed sign-ins per client address (console/throttle.py).
    throttle: SignInThrottle = field(default_factory=SignInThrottle)
    # Unix milliseconds now: the Violations page's window ends here (tests pass a fake clock).
    wall_clock_ms: Callable[[], int] = field(default=lambda: time.time_ns() // 1_000_000)
    templates: jinja2.Environment = field(init=False)
    _backend: Backend | None = None

    def __post_init__(self) -> None:
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(resources.files("spendgate_server.console") / "templates")),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters["usd"] = format_usd
        self.templates.filters["utc"] = _utc
        self.templates.filters["iso"] = _iso
        self.templates.filters["clock"] = _clock

    @property
    def backend(self) -> Backend:
        """The service client, opened at start-up (in the event loop that serves requests)."""
        if self._backend is None:
            raise RuntimeError("the console's backend is opened by the application's lifespan")
        return self._backend

    def open(self) -> None:
        """Open the service client; called once the event loop runs."""
        self._backend = self.backend_factory()

    async def close(self) -> None:
        """Close the service client."""
        if self._backend is not None:
            await self._backend.close()
            self._backend = None

    @property
    def session_cookie(self) -> str:
        """The session cookie's name: ``__Host-`` (Secure, host-only, path /) whenever it can be."""
        return "__Host-sg_session" if self.secure_cookies else "sg_session"

    @property
    def signin_cookie(self) -> str:
        """The sign-in form's double-submit CSRF cookie."""
        return "__Host-sg_signin" if self.secure_cookies else "sg_signin"

    def set_cookie(self, response: Response, name: str, value: str) -> None:
        """A browser-session cookie that scripts cannot read and other sites never send."""
        response.set_cookie(
            name, value, path="/", httponly=True, samesite="strict", secure=self.secure_cookies
        )

    def clear_cookie(self, response: Response, name: str) -> None:
        """Tell the browser to forget a cookie."""
        response.delete_cookie(name, path="/", httponly=True, samesite="strict", secure=self.secure_cookies)


def _utc(unix_ms: int) -> str:
    """Unix milliseconds as people read them here: ``2026-01-02 15:04:05 UTC``."""
    return datetime.fromtimestamp(unix_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _clock(unix_ms: int) -> str:
    """Unix milliseconds as a time of day in UTC: ``15:04``."""
    return datetime.fromtimestamp(unix_ms / 1000, UTC).strftime("%H:%M")


def _iso(unix_ms: int) -> str:
    """Unix milliseconds for a ``<time datetime>`` attribute."""
    return datetime.fromtimestamp(unix_ms / 1000, UTC).isoformat(timespec="seconds")


def console_of(request: Request) -> Console:
    """The Console behind this request's application."""
    console: Console = request.app.state.console
    return console


def current_session(request: Request, *, touch: bool = True) -> ConsoleSession | None:
    """The signed-in session named by the request's cookie, or None.

    Args:
        request: the request.
        touch: the request is activity, restarting the session's idle timer (the live
            feed's stream is not).
    """
    console = console_of(request)
    session_id = request.cookies.get(console.session_cookie, "")
    if not session_id:
        return None
    return console.sessions.get(session_id) if touch else console.sessions.peek(session_id)


class FormRefused(Exception):
    """A POST failed the origin or CSRF checks; answered 403 and never acted on."""


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""


async def read_form(request: Request, expected_token: str) -> dict[str, list[str]]:
    """The fields of a same-origin, CSRF-token-bearing url-encoded POST.

    Raises:
        FormRefused: the request came from another origin, or without the right token.
    """
    console = console_of(request)
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site != "same-origin":
        raise FormRefused(f"a {fetch_site} request cannot change anything here")
    origin = request.headers.get("origin") or _origin_of(request.headers.get("referer", ""))
    if origin not in console.allowed_origins:
        raise FormRefused(f"a form from {origin or 'an unknown origin'} cannot change anything here")
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise FormRefused("forms are url-encoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise FormRefused("the form is too large")
    try:
        fields = parse_qs(
            body.decode(), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS, strict_parsing=False
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormRefused("the form could not be read") from exc
    presented = (fields.get("csrf_token") or [""])[0]
    if not expected_token or not hmac.compare_digest(presented.encode(), expected_token.encode()):
        raise FormRefused("the form's security token is missing or out of date: reload the page and retry")
    return fields


def safe_next(target: str | None) -> str:
    """A local path to return to after sign-in: never another site (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/rules"
    return target


def render(
    request: Request,
    template: str,
    context: Mapping[str, Any] | None = None,
    *,
    status_code: int = 200,
    session: ConsoleSession | None = None,
) -> HTMLResponse:
    """A page from its template; never cached, since it holds the tenant's data."""
    console = console_of(request)
    html = console.templates.get_template(template).render(
        {
            "nav": console.nav,
            "path": request.url.path,
            "session": session,
            "target": console.target,
            **(context or {}),
        }
    )
    return HTMLResponse(html, status_code=status_code, headers={"cache-control": "no-store"})


Handler = Callable[[Request, ConsoleSession], Awaitable[Response]]


def page(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a page handler: signed-in sessions only, and the service's failures turned into pages.

    Without a session a GET is sent to sign in (and back afterwards) and anything else is
    refused with 403. A key the service no longer accepts ends the session.
    """

    async def endpoint(request: Request) -> Response:
        console = console_of(request)
        session = current_session(request)
        if session is None:
            if request.method in ("GET", "HEAD"):
                wanted = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"/signin?next={quote(wanted, safe='/')}", status_code=303)
            return render(request, "refused.html", {"reason": "sign in first"}, status_code=403)
        try:
            return await handler(request, session)
        except FormRefused as exc:
            _log.warning("console_form_refused", reason=str(exc), path=request.url.path)
            return render(request, "refused.html", {"reason": str(exc)}, status_code=403, session=session)
        except NotAuthorized as exc:
            console.sessions.delete(session.session_id)
            _log.info("console_session_ended", key=session.key_label, reason=str(exc))
            response = RedirectResponse("/signin?ended=1", status_code=303)
            console.clear_cookie(response, console.session_cookie)
            return response
        except BackendUnavailable as exc:
            context = {"title": "spendgate is unreachable", "message": str(exc)}
            return render(request, "error.html", context, status_code=503, session=session)
        except BackendError as exc:
            context = {"title": "spendgate refused the request", "message": str(exc)}
            return render(request, "error.html", context, status_code=502, session=session)

    return endpoint


def new_signin_token() -> str:
    """A fresh token for the sign-in form's double-submit cookie."""
    return secrets.token_urlsafe(32)


class SecurityHeaders:
    """ASGI middleware: refuse unknown Host headers; add the security headers to every response."""

    def __init__(self, app: ASGIApp, allowed_hosts: frozenset[str]) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
        if host.lower() not in self.allowed_hosts:
            response = Response("unknown host\n", status_code=400, media_type="text/plain")
            await self._with_headers(response)(scope, receive, send)
            return
        await self._with_headers(self.app)(scope, receive, send)

    @staticmethod
    def _with_headers(app: ASGIApp) -> ASGIApp:
        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            async def send_with_headers(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", []), *_SECURITY_HEADERS]
                await send(message)

            await app(scope, receive, send_with_headers)

        return wrapped
