"""Sign-in and sign-out with an admin API key.

The key is checked by the service (an admin-only call that changes nothing), then kept in
the server-side session map; the browser gets only a random session id. A service without
any key (open development mode, the ``make run`` default) needs none: the page says so and
offers to go on. The sign-in form has no session yet, so its CSRF token is a double-submit
cookie, plus the same origin check as every other form. Failed sign-ins slow their client
address down (console/throttle.py): past a few, the form answers 429 with Retry-After
before asking the service anything.
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
from spendgate_server.store.keys import key_problem, parse_key

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
    request: Request,
    *,
    error: str = "",
    next_path: str = "",
    status_code: int = 200,
    open_mode: bool = False,
) -> Response:
    console = console_of(request)
    token = new_signin_token()
    notice = next((text for name, text in NOTICES.items() if name in request.query_params), "")
    context = {
        "title": "Open development mode" if open_mode else "Sign in",
        "csrf_token": token,
        "error": error,
        "notice": notice,
        "next_path": next_path or safe_next(request.query_params.get("next")),
        "open_mode": open_mode,
    }
    response = render(request, "signin.html", context, status_code=status_code)
    console.set_cookie(response, console.signin_cookie, token)
    return response


async def _open_mode(request: Request) -> bool:
    """Whether the service runs without keys; False when that cannot be told (the form then asks)."""
    try:
        return await console_of(request).backend.open_mode()
    except BackendError as exc:
        _log.info("console_open_mode_unknown", error=str(exc))
        return False


def _refusal(exc: NotAuthorized, key_id: str) -> str:
    """Why the service refused a well-formed key, in words."""
    if exc.wrong_scope:
        return (
            f"Key {key_id} is a client key: the console needs an admin key "
            "(spendgate keys create --scope admin)."
        )
    return f"The service refused key {key_id}: {exc}. Check that the key belongs to this deployment."


async def signin_form(request: Request) -> Response:
    """GET /signin: the key form, or on a service without keys a button to go on (or on to the pages)."""
    if current_session(request) is not None:
        return RedirectResponse(safe_next(request.query_params.get("next")), status_code=303)
    return _signin_page(request, open_mode=await _open_mode(request))


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
    # A service without keys takes calls with none: going on needs no key (and any key "works").
    open_mode = await _open_mode(request)
    error = ""
    if not api_key:
        error = "" if open_mode else "Enter an admin API key (sgk_…)."
    elif not open_mode and (problem := key_problem(api_key)):
        error = f"That is not a spendgate API key: {problem}."
    elif not _KEY_SHAPE.fullmatch(api_key):
        error = "That is not a spendgate API key: it is too long, or not plain text."
    if error:
        console.throttle.failed(address)
        return _signin_page(request, error=error, next_path=next_path, status_code=422)
    parsed = parse_key(api_key)
    key_id = parsed[0] if parsed else ""
    try:
        await console.backend.verify_admin(api_key)
    except NotAuthorized as exc:
        console.throttle.failed(address)
        _log.info("console_signin_refused", key_id=key_id or None, reason=str(exc))
        return _signin_page(request, error=_refusal(exc, key_id), next_path=next_path, status_code=401)
    except BackendUnavailable as exc:
        _log.info("console_signin_unavailable", error=str(exc))
        error = (
            f"The console cannot reach spendgate at {console.target} ({exc}). Is the server running, "
            "and is the console's --target right? Then try again."
        )
        return _signin_page(request, error=error, next_path=next_path, status_code=503)
    except BackendError as exc:
        error = f"spendgate at {console.target} answered the sign-in with an error: {exc}"
        return _signin_page(request, error=error, next_path=next_path, status_code=502)
    console.throttle.succeeded(address)
    label = "open development mode" if open_mode else f"key {key_id}"
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
