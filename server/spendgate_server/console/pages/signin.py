"""Sign-in and sign-out with an admin API key.

The key is checked by the service (an admin-only call that changes nothing), then kept in
the server-side session map; the browser gets only a random session id. The sign-in form
has no session yet, so its CSRF token is a double-submit cookie, plus the same origin
check as every other form. Failed sign-ins slow their client address down
(console/throttle.py): past a few, the form answers 429 with Retry-After before asking
the service anything.
"""

from __future__ import annotations

import re

import structlog
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from spendgate_server.console.backend import BackendError, BackendUnavailable, NotAuthorized
from spendgate_server.console.web import (
    FormRefused,
    console_of,
    current_session,
    new_signin_token,
    read_form,
    render,
    safe_next,
)
from spendgate_server.store.keys import parse_key

__all__ = ["ROUTES"]

_log = structlog.get_logger("spendgate.console")

# What may travel as a gRPC metadata value: printable ASCII without spaces, bounded.
_KEY_SHAPE = re.compile(r"[!-~]{1,256}")
NOTICES = {
    "ended": "Your session ended: the service no longer accepts that key, or it was idle too long.",
    "signed_out": "You are signed out.",
}


def _client_address(request: Request) -> str:
    # The socket's peer: forwarded headers are never trusted (uvicorn runs with proxy_headers off).
    return request.client.host if request.client else ""


def _signin_page(
    request: Request, *, error: str = "", next_path: str = "", status_code: int = 200
) -> Response:
    console = console_of(request)
    token = new_signin_token()
    notice = next((text for name, text in NOTICES.items() if name in request.query_params), "")
    context = {
        "title": "Sign in",
        "csrf_token": token,
        "error": error,
        "notice": notice,
        "next_path": next_path or safe_next(request.query_params.get("next")),
    }
    response = render(request, "signin.html", context, status_code=status_code)
    console.set_cookie(response, console.signin_cookie, token)
    return response


async def signin_form(request: Request) -> Response:
    """GET /signin: the key form (or on to the pages when already signed in)."""
    if current_session(request) is not None:
        return RedirectResponse(safe_next(request.query_params.get("next")), status_code=303)
    return _signin_page(request)


async def signin(request: Request) -> Response:
    """POST /signin: verify the key with the service, then start a session."""
    console = console_of(request)
    try:
        form = await read_form(request, request.cookies.get(console.signin_cookie, ""))
    except FormRefused as exc:
        _log.warning("console_form_refused", reason=str(exc), path=request.url.path)
        return render(request, "refused.html", {"reason": str(exc)}, status_code=403)
    next_path = safe_next((form.get("next") or [""])[0])
    address = _client_address(request)
    wait = console.throttle.retry_after_seconds(address)
    if wait:
        _log.info("console_signin_throttled", retry_after_seconds=wait)
        error = f"Too many failed sign-ins from your address; try again in {wait} s."
        response = _signin_page(request, error=error, next_path=next_path, status_code=429)
        response.headers["retry-after"] = str(wait)
        return response
    api_key = (form.get("api_key") or [""])[0].strip()
    if not _KEY_SHAPE.fullmatch(api_key):
        console.throttle.failed(address)
        return _signin_page(
            request, error="Enter an admin API key (sgk_…).", next_path=next_path, status_code=422
        )
    parsed = parse_key(api_key)
    key_id = parsed[0] if parsed else ""
    try:
        await console.backend.verify_admin(api_key)
    except NotAuthorized as exc:
        console.throttle.failed(address)
        _log.info("console_signin_refused", key_id=key_id or None)
        return _signin_page(request, error=str(exc), next_path=next_path, status_code=401)
    except BackendUnavailable as exc:
        error = f"spendgate at {console.target} did not answer ({exc}); try again."
        return _signin_page(request, error=error, next_path=next_path, status_code=503)
    except BackendError as exc:
        return _signin_page(request, error=str(exc), next_path=next_path, status_code=502)
    # A malformed key accepted by the service means it runs in open development mode (no keys).
    console.throttle.succeeded(address)
    label = f"key {key_id}" if key_id else "open development mode"
    session = console.sessions.create(api_key, label)
    _log.info("console_signed_in", key_id=key_id or None)
    response = RedirectResponse(next_path, status_code=303)
    console.set_cookie(response, console.session_cookie, session.session_id)
    console.clear_cookie(response, console.signin_cookie)
    return response


async def signout(request: Request) -> Response:
    """POST /signout: forget the session (and with it the key)."""
    console = console_of(request)
    session = current_session(request)
    if session is not None:
        try:
            await read_form(request, session.csrf_token)
        except FormRefused as exc:
            return render(request, "refused.html", {"reason": str(exc)}, status_code=403, session=session)
        console.sessions.delete(session.session_id)
        _log.info("console_signed_out", key=session.key_label)
    response = RedirectResponse("/signin?signed_out=1", status_code=303)
    console.clear_cookie(response, console.session_cookie)
    return response


ROUTES = [
    Route("/signin", signin_form, methods=["GET"]),
    Route("/signin", signin, methods=["POST"]),
    Route("/signout", signout, methods=["POST"]),
]
