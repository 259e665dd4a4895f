"""Composition root of the web console: settings → backend → sessions → pages → an ASGI app."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources

import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from spendgate_server.console.backend import Backend, GrpcBackend
from spendgate_server.console.pages import NAV, ROUTES
from spendgate_server.console.sessions import SessionStore
from spendgate_server.console.settings import ConsoleSettings
from spendgate_server.console.throttle import SignInThrottle
from spendgate_server.console.web import MAX_FORM_BYTES, Console, SecurityHeaders
from spendgate_server.errors import ConfigError
from spendgate_server.logging import configure_logging
from spendgate_server.rpc.auth import is_loopback

__all__ = ["allowed_origins", "create_app", "run_console"]

_log = structlog.get_logger("spendgate.console")


def _origin(scheme: str, host: str, port: int) -> str:
    default = {"http": 80, "https": 443}[scheme]
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{scheme}://{host}" if port == default else f"{scheme}://{host}:{port}"


def allowed_origins(settings: ConsoleSettings, port: int) -> frozenset[str]:
    """The origins browsers may use: --public-url, and on loopback every loopback name of the port."""
    scheme = "https" if settings.https_cert else "http"
    origins = {settings.public_url} if settings.public_url else set()
    if is_loopback(settings.host):
        origins |= {_origin(scheme, name, port) for name in ("127.0.0.1", "localhost", "::1")}
    return frozenset(origins)


def create_app(
    *,
    backend_factory: Callable[[], Backend],
    origins: frozenset[str],
    secure_cookies: bool,
    target: str,
    projects: tuple[str, ...] = (),
    idle_seconds: float = 3600,
    max_age_seconds: float = 12 * 3600,
    clock: Callable[[], float] = time.monotonic,
    wall_clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
) -> Starlette:
    """The console's ASGI application.

    Args:
        backend_factory: Opens the service client; called once the event loop runs.
        origins: Every origin (scheme://host[:port]) browsers reach the console at.
        secure_cookies: Browsers use HTTPS: cookies get ``Secure`` and the ``__Host-`` prefix.
        target: The service's address, shown in the page footer.
        projects: Projects listed on the Rules page and offered in the filters.
        idle_seconds: A session ends after this long without a request.
        max_age_seconds: A session ends this long after sign-in.
        clock: Seconds, for session expiry and the sign-in throttle (tests pass a fake one).
        wall_clock_ms: Unix milliseconds now, for time windows (tests pass a fake one).
    """
    console = Console(
        backend_factory=backend_factory,
        sessions=SessionStore(idle_seconds=idle_seconds, max_age_seconds=max_age_seconds, clock=clock),
        allowed_origins=origins,
        secure_cookies=secure_cookies,
        target=target,
        projects=projects,
        nav=NAV,
        throttle=SignInThrottle(clock=clock),
        wall_clock_ms=wall_clock_ms,
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        console.open()
        try:
            yield
        finally:
            await console.close()
            _log.info("console_stopped")

    async def home(request: Request) -> Response:
        return RedirectResponse("/rules", status_code=303)

    static = StaticFiles(directory=str(resources.files("spendgate_server.console") / "static"))
    app = Starlette(
        routes=[Route("/", home, methods=["GET"]), *ROUTES, Mount("/static", static, name="static")],
        middleware=[
            Middleware(SecurityHeaders, allowed_hosts=frozenset(o.split("://", 1)[1] for o in origins))
        ],
        lifespan=lifespan,
        max_body_size=MAX_FORM_BYTES,
    )
    app.state.console = console
    return app


def run_console(settings: ConsoleSettings) -> None:
    """Serve the console until SIGINT/SIGTERM (uvicorn drains open requests, then stops).

    Raises:
        ConfigError: the address cannot be bound (taken, or not this machine's).
    """
    configure_logging(settings.log_format, settings.log_level)
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host.strip("[]"), settings.port))
    except OSError as exc:
        sock.close()
        reason = (exc.strerror or str(exc)).lower()
        raise ConfigError(f"--host {settings.host} --port {settings.port}: cannot bind: {reason}") from exc
    # Listening before uvicorn starts: connections made from now on queue instead of failing.
    sock.listen(128)
    port: int = sock.getsockname()[1]
    origins = allowed_origins(settings, port)
    app = create_app(
        backend_factory=lambda: GrpcBackend(
            settings.target,
            timeout_seconds=settings.rpc_timeout_seconds,
            tls_ca=settings.tls_ca,
            tls_cert=settings.tls_cert,
            tls_key=settings.tls_key,
        ),
        origins=origins,
        secure_cookies=settings.secure_cookies,
        target=settings.target,
        projects=settings.projects,
        idle_seconds=settings.session_idle_minutes * 60,
        max_age_seconds=settings.session_max_hours * 3600,
    )
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        # The origin checks use the configured origins, never forwarded headers.
        proxy_headers=False,
        server_header=False,
        ssl_certfile=settings.https_cert or None,
        ssl_keyfile=settings.https_key or None,
        timeout_graceful_shutdown=5,
    )
    url = settings.public_url or min(origins)
    _log.info("console_serving", host=settings.host, port=port, url=url, target=settings.target)
    # On SIGINT/SIGTERM uvicorn finishes open requests, runs the lifespan's shutdown, then
    # re-raises the signal, so the process ends the way the signal says.
    uvicorn.Server(config).run(sockets=[sock])
