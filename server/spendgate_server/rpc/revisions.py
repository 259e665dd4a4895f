"""What the servicers of versioned documents (config, policies) translate alike.

A stored revision's version, etag, author and time; one page of its history; who
writes; and how a failure becomes a status.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NoReturn, Protocol, TypeVar

import grpc

from spendgate_server.errors import SpendgateError
from spendgate_server.rpc.alerts_wire import timestamp
from spendgate_server.rpc.auth import current_principal
from spendgate_server.rpc.status import abort, rpc_status
from spendgate_server.rpc.validation import offset_page_from_proto

__all__ = ["StoredRevision", "actor_of", "fail", "now_ms", "page_of", "page_request", "revision_fields"]

Context = grpc.aio.ServicerContext[Any, Any]
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 500
_R = TypeVar("_R")


class StoredRevision(Protocol):
    """What every stored revision carries (StoredConfig, StoredPolicies)."""

    @property
    def version(self) -> int: ...

    @property
    def etag(self) -> str: ...

    @property
    def updated_by(self) -> str: ...

    @property
    def update_time_ms(self) -> int: ...


class _PageRequest(Protocol):
    @property
    def page_size(self) -> int: ...

    @property
    def page_token(self) -> str: ...


def revision_fields(stored: StoredRevision) -> dict[str, Any]:
    """Keyword arguments of a revision message: ``version``, ``etag``, ``updated_by``, ``update_time``."""
    return {
        "version": stored.version,
        "etag": stored.etag,
        "updated_by": stored.updated_by,
        "update_time": timestamp(stored.update_time_ms),
    }


def page_request(request: _PageRequest) -> tuple[int, int]:
    """``(size, start)`` of a List*Revisions request; InvalidArgument names a bad field."""
    return offset_page_from_proto(
        request.page_size, request.page_token, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE
    )


def page_of(revisions: Sequence[_R], size: int, start: int) -> tuple[Sequence[_R], str]:
    """One page of a history, and the token of the next page ("" after the last)."""
    more = start + size < len(revisions)
    return revisions[start : start + size], str(start + size) if more else ""


def now_ms() -> int:
    """The time of a write, in Unix milliseconds."""
    return time.time_ns() // 1_000_000


def actor_of(context: Context) -> str:
    """Who writes: the API key's name and id; in open dev mode, whoever the caller says."""
    principal = current_principal()
    if principal.key_id:
        return f"{principal.name} ({principal.key_id})"
    for key, value in context.invocation_metadata() or ():
        if key == "x-spendgate-actor" and isinstance(value, str):
            return value[:128]
    return "anonymous"


async def fail(context: Context, exc: Exception, logger: Any, service: str) -> NoReturn:
    """Abort the call with the status of ``exc``; log it first when it is not one of ours."""
    code, status = rpc_status(exc)
    if not isinstance(exc, SpendgateError):
        logger.error("internal_error", rpc=service, exc_info=exc)
    await abort(context, code, status)
