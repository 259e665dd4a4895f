"""Signed-in browsers: a server-side, in-memory map from a random session id to the admin key.

The key never leaves this process's memory: the browser holds only the session id (an
HttpOnly cookie), so a script injected into a page could not read either. Sessions end on
sign-out, after ``idle_seconds`` without a request, ``max_age_seconds`` after sign-in, when
the service stops accepting the key, and when the console restarts.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ConsoleSession", "SessionStore"]


@dataclass(slots=True)
class ConsoleSession:
    """One signed-in browser."""

    session_id: str
    api_key: str
    # Shown in the page header so an admin knows which key they act as; never the secret.
    key_label: str
    # Every form of this session carries it; a POST without it is refused (CSRF).
    csrf_token: str
    created_at: float
    last_seen_at: float


class SessionStore:
    """Sessions by id, with idle and absolute expiry and a bound on how many are kept."""

    def __init__(
        self,
        *,
        idle_seconds: float,
        max_age_seconds: float,
        max_sessions: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions: dict[str, ConsoleSession] = {}
        self._idle = idle_seconds
        self._max_age = max_age_seconds
        self._max_sessions = max_sessions
        self._clock = clock

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, api_key: str, key_label: str) -> ConsoleSession:
        """A new session with fresh random id and CSRF token (a new id at every sign-in: no fixation)."""
        now = self._clock()
        self._expire(now)
        if len(self._sessions) >= self._max_sessions:
            # Dicts keep insertion order: the oldest sign-in goes first.
            del self._sessions[next(iter(self._sessions))]
        session = ConsoleSession(
            session_id=secrets.token_urlsafe(32),
            api_key=api_key,
            key_label=key_label,
            csrf_token=secrets.token_urlsafe(32),
            created_at=now,
            last_seen_at=now,
        )
        self._sessions[session.session_id] = session
        return session

    def get(self, session_id: str) -> ConsoleSession | None:
        """The live session with this id (its idle timer restarts), or None."""
        session = self.peek(session_id)
        if session is not None:
            session.last_seen_at = self._clock()
        return session

    def peek(self, session_id: str) -> ConsoleSession | None:
        """The live session with this id, or None; its idle timer does not restart.

        What the live alerts feed uses: a feed left open in an unattended browser is not
        activity, so it never keeps a session alive, and it stops when the session ends.
        """
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._clock()
        if now - session.last_seen_at > self._idle or now - session.created_at > self._max_age:
            del self._sessions[session_id]
            return None
        return session

    def delete(self, session_id: str) -> None:
        """End a session (sign-out, or the service refused its key)."""
        self._sessions.pop(session_id, None)

    def _expire(self, now: float) -> None:
        for session_id, session in list(self._sessions.items()):
            if now - session.last_seen_at > self._idle or now - session.created_at > self._max_age:
                del self._sessions[session_id]
