"""The console's only way to spendgate: ConfigService calls made with the signed-in admin's key.

The console keeps no data of its own; every page is read from the service when it is
shown, and every write is the service's compare-and-set. gRPC failures become the few
errors a page can act on (sign in again, show field errors, show a conflict, say the
service is down).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import grpc
from google.rpc import error_details_pb2, status_pb2
from spendgate.v1 import config_pb2 as cpb
from spendgate.v1 import config_pb2_grpc, policy_pb2_grpc
from spendgate.v1 import policy_pb2 as ppb

from spendgate_server.config import EnforcementConfig, config_to_dict
from spendgate_server.errors import ConfigError, FieldViolation, SpendgateError
from spendgate_server.validation import config_from_proto
from spendgate_server.wire import config_to_proto

__all__ = [
    "Backend",
    "BackendError",
    "BackendUnavailable",
    "ConfigView",
    "EditConflict",
    "GrpcBackend",
    "InvalidInput",
    "NotAuthorized",
    "RevisionPage",
]

# A project name no server accepts: the fallback admin probe must never write anything.
_PROBE_PROJECT = "!"


class BackendError(SpendgateError):
    """A call to the spendgate service failed; the message is safe to show (it never holds a key)."""


class NotAuthorized(BackendError):
    """The key is unknown, revoked, or not an admin key: the browser must sign in again."""


class InvalidInput(BackendError):
    """The service refused the input; ``violations`` name each bad field (google.rpc.BadRequest)."""

    def __init__(self, message: str, violations: Sequence[FieldViolation]) -> None:
        super().__init__(message)
        self.violations = tuple(violations)


class EditConflict(BackendError):
    """The etag was stale: someone saved first, and nothing was written."""


class BackendUnavailable(BackendError):
    """The service could not be reached, or did not answer in time."""


@dataclass(frozen=True, slots=True)
class ConfigView:
    """A config as the console shows it: the user-facing rule keys, and who wrote it when."""

    project: str
    rules: dict[str, Any]
    version: int = 0
    etag: str = ""
    updated_by: str = ""
    update_time: datetime | None = None

    @property
    def written(self) -> bool:
        """False for a config nobody has written yet (it holds no rules)."""
        return self.version > 0


@dataclass(frozen=True, slots=True)
class RevisionPage:
    """One page of history, newest first; ``older`` is the revision just before the last one."""

    revisions: tuple[ConfigView, ...]
    next_page_token: str
    older: ConfigView | None


class Backend(Protocol):
    """What the pages need from spendgate (GrpcBackend; tests also use an in-memory fake)."""

    async def verify_admin(self, api_key: str) -> None:
        """Return when ``api_key`` is a valid admin key; raise NotAuthorized otherwise."""
        ...

    async def get_config(self, api_key: str, project: str) -> ConfigView:
        """The current config of the tenant (project '') or of a project."""
        ...

    async def update_config(
        self, api_key: str, project: str, config: EnforcementConfig, etag: str
    ) -> ConfigView:
        """Compare-and-set: EditConflict when ``etag`` is stale, InvalidInput when refused."""
        ...

    async def list_revisions(
        self, api_key: str, project: str, page_size: int, page_token: str
    ) -> RevisionPage:
        """One page of the config's history."""
        ...

    async def close(self) -> None:
        """Release the connection."""
        ...


def _view(message: cpb.Config) -> ConfigView:
    update_time = None
    if message.version:
        update_time = datetime.fromtimestamp(message.update_time.seconds, UTC)
    return ConfigView(
        project=message.project,
        rules=config_to_dict(config_from_proto(message.enforcement_config)) if message.version else {},
        version=message.version,
        etag=message.etag,
        updated_by=message.updated_by,
        update_time=update_time,
    )


def _violations(error: grpc.aio.AioRpcError) -> list[FieldViolation]:
    """The google.rpc.BadRequest field violations carried in ``grpc-status-details-bin``."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            found = []
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad_request = error_details_pb2.BadRequest()
                    detail.Unpack(bad_request)
                    found += [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
            return found
    return []


def _translate(error: grpc.aio.AioRpcError) -> BackendError:
    code, details = error.code(), error.details() or ""
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return NotAuthorized(details)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(details, _violations(error))
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        return EditConflict(details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return BackendUnavailable(details)
    return BackendError(f"{code.name}: {details}")


def _read(flag: str, path: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path}: {exc.strerror}") from exc


class GrpcBackend:
    """Backend over one grpc.aio channel to ``target``; each call carries the caller's key."""

    def __init__(
        self,
        target: str,
        *,
        timeout_seconds: float = 5.0,
        tls_ca: str = "",
        tls_cert: str = "",
        tls_key: str = "",
    ) -> None:
        """Open the channel (lazily connected) in the running event loop.

        Raises:
            ConfigError: a TLS file cannot be read.
        """
        if tls_ca:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read("--tls-ca", tls_ca),
                private_key=_read("--tls-key", tls_key),
                certificate_chain=_read("--tls-cert", tls_cert),
            )
            self._channel = grpc.aio.secure_channel(target, credentials)
        else:
            self._channel = grpc.aio.insecure_channel(target)
        self._stub = config_pb2_grpc.ConfigServiceStub(self._channel)
        self._policies = policy_pb2_grpc.PolicyServiceStub(self._channel)
        self._timeout = timeout_seconds

    def _metadata(self, api_key: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {api_key}"),)

    async def verify_admin(self, api_key: str) -> None:
        """Prove the key is an admin key without changing anything.

        GetPolicies is an admin-only read. A server older than PolicyService answers it
        UNIMPLEMENTED; there UpdateConfig, the admin-only write, is asked to store a config
        for a project name that can never be valid: the server checks the key and its
        scope first, so an admin key gets INVALID_ARGUMENT on ``project``, and nothing is
        ever written.
        """
        metadata = self._metadata(api_key)
        try:
            await self._policies.GetPolicies(
                ppb.GetPoliciesRequest(), timeout=self._timeout, metadata=metadata
            )
            return
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.UNIMPLEMENTED:
                raise _translate(exc) from exc
        request = cpb.UpdateConfigRequest(project=_PROBE_PROJECT)
        try:
            await self._stub.UpdateConfig(request, timeout=self._timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            error = _translate(exc)
            if isinstance(error, InvalidInput) and [v.field for v in error.violations] == ["project"]:
                return
            raise error from exc
        raise BackendError("the service accepted a config for an invalid project name")  # pragma: no cover

    async def get_config(self, api_key: str, project: str) -> ConfigView:
        """The current config of the tenant (project '') or of a project."""
        try:
            response = await self._stub.GetConfig(
                cpb.GetConfigRequest(project=project), timeout=self._timeout, metadata=self._metadata(api_key)
            )
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from exc
        return _view(response.config)

    async def update_config(
        self, api_key: str, project: str, config: EnforcementConfig, etag: str
    ) -> ConfigView:
        """Compare-and-set: EditConflict when ``etag`` is stale, InvalidInput when refused."""
        request = cpb.UpdateConfigRequest(
            project=project, enforcement_config=config_to_proto(config), etag=etag
        )
        try:
            response = await self._stub.UpdateConfig(
                request, timeout=self._timeout, metadata=self._metadata(api_key)
            )
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from exc
        return _view(response.config)

    async def list_revisions(
        self, api_key: str, project: str, page_size: int, page_token: str
    ) -> RevisionPage:
        """One page of history, plus the revision before its last one (to diff that one too)."""
        metadata = self._metadata(api_key)
        try:
            page = await self._stub.ListConfigRevisions(
                cpb.ListConfigRevisionsRequest(project=project, page_size=page_size, page_token=page_token),
                timeout=self._timeout,
                metadata=metadata,
            )
            older = None
            if page.next_page_token:
                after = await self._stub.ListConfigRevisions(
                    cpb.ListConfigRevisionsRequest(
                        project=project, page_size=1, page_token=page.next_page_token
                    ),
                    timeout=self._timeout,
                    metadata=metadata,
                )
                older = _view(after.revisions[0]) if after.revisions else None
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from exc
        return RevisionPage(tuple(_view(r) for r in page.revisions), page.next_page_token, older)

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()
