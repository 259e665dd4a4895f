"""The console's only way to spendgate: calls to its services made with the signed-in admin's key.

ConfigService (rules), PolicyService (policies), ViolationService (the alerts feed, paged
and live) and SessionService (top sessions and their spend). The console keeps no data of
its own; every page is read from the service when it is shown, and every write is the
service's compare-and-set. Replies are turned into the server's own domain types
(``Policies``, ``Violation``, ``SessionSummary``) so pages share their vocabulary with
the CLI. gRPC failures become the few errors a page can act on (sign in again, show
field errors, show a conflict, say the service is down).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import grpc
from google.rpc import error_details_pb2, status_pb2
from spendgate.v1 import config_pb2 as cpb
from spendgate.v1 import config_pb2_grpc, policy_pb2_grpc, session_pb2_grpc, violation_pb2_grpc
from spendgate.v1 import policy_pb2 as ppb
from spendgate.v1 import session_pb2 as spb
from spendgate.v1 import violation_pb2 as vpb

from spendgate_server.engine.config import EnforcementConfig, Rule, config_to_dict
from spendgate_server.errors import ConfigError, FieldViolation, SpendgateError
from spendgate_server.policy.policies import BannedPattern, KeyRule, Policies, policies_to_dict
from spendgate_server.policy.violations import PatternHit, PolicyType, Violation, ViolationFilter
from spendgate_server.rpc.alerts_wire import policies_to_proto, timestamp
from spendgate_server.rpc.validation import config_from_proto
from spendgate_server.rpc.wire import config_to_proto
from spendgate_server.store.insights import SessionSummary, SpendPoint

__all__ = [
    "OPEN_MODE_TTL_SECONDS",
    "Backend",
    "BackendError",
    "BackendUnavailable",
    "ConfigView",
    "EditConflict",
    "GrpcBackend",
    "InvalidInput",
    "NotAuthorized",
    "PolicyRevisionPage",
    "PolicyView",
    "RevisionPage",
    "ViolationPage",
]

# A project name no server accepts: the fallback admin probe must never write anything.
_PROBE_PROJECT = "!"
# How long the answer to "does the service run without keys?" is kept (see GrpcBackend.open_mode).
OPEN_MODE_TTL_SECONDS = 30.0


class BackendError(SpendgateError):
    """A call to the spendgate service failed; the message is safe to show (it never holds a key)."""


class NotAuthorized(BackendError):
    """The key is unknown, revoked, or not an admin key: the browser must sign in again.

    ``wrong_scope`` tells a valid client key (PERMISSION_DENIED) from a key the service
    does not accept at all (UNAUTHENTICATED).
    """

    def __init__(self, message: str, *, wrong_scope: bool = False) -> None:
        super().__init__(message)
        self.wrong_scope = wrong_scope


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


@dataclass(frozen=True, slots=True)
class PolicyView:
    """The tenant's policies in their user-facing form (``policies_to_dict``), and who wrote them when."""

    policies: dict[str, Any]
    version: int = 0
    etag: str = ""
    updated_by: str = ""
    update_time: datetime | None = None

    @property
    def written(self) -> bool:
        """False while nobody has written policies (every policy is off)."""
        return self.version > 0


@dataclass(frozen=True, slots=True)
class PolicyRevisionPage:
    """One page of policy history, newest first; ``older`` is the revision just before the last one."""

    revisions: tuple[PolicyView, ...]
    next_page_token: str
    older: PolicyView | None


@dataclass(frozen=True, slots=True)
class ViolationPage:
    """One page of the alerts feed, newest first; ``next_page_token`` pages on to older ones."""

    violations: tuple[Violation, ...]
    next_page_token: str


class Backend(Protocol):
    """What the pages need from spendgate (GrpcBackend; tests also use an in-memory fake)."""

    async def verify_admin(self, api_key: str) -> None:
        """Return when ``api_key`` is a valid admin key; raise NotAuthorized otherwise."""
        ...

    async def open_mode(self) -> bool:
        """Whether the service takes calls without any key (open development mode: it has none)."""
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

    async def get_policies(self, api_key: str) -> PolicyView:
        """The tenant's current policies."""
        ...

    async def update_policies(self, api_key: str, policies: Policies, etag: str) -> PolicyView:
        """Compare-and-set: EditConflict when ``etag`` is stale, InvalidInput when refused."""
        ...

    async def list_policy_revisions(
        self, api_key: str, page_size: int, page_token: str
    ) -> PolicyRevisionPage:
        """One page of the policies' history."""
        ...

    async def list_violations(
        self, api_key: str, where: ViolationFilter, page_size: int, page_token: str, *, since_ms: int = 0
    ) -> ViolationPage:
        """One page of the violations ``where`` admits (found at ``since_ms`` or later), newest first."""
        ...

    def watch_violations(
        self, api_key: str, where: ViolationFilter, cursor: str
    ) -> AsyncGenerator[Violation, None]:
        """The violations ``where`` admits found after ``cursor``, oldest first, then live, until closed."""
        ...

    async def list_sessions(self, api_key: str, project: str, page_size: int) -> tuple[SessionSummary, ...]:
        """The sessions (of ``project`` when given) with the most spend, highest first."""
        ...

    async def get_session_spend(self, api_key: str, session_id: str) -> tuple[SpendPoint, ...]:
        """One session's settled spend per minute, oldest first."""
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


def _time(message: Any) -> datetime:
    """A google.protobuf.Timestamp as an aware UTC datetime."""
    return datetime.fromtimestamp(message.seconds + message.nanos / 1e9, UTC)


def _ms(message: Any) -> int:
    """A google.protobuf.Timestamp as Unix milliseconds."""
    return int(message.seconds) * 1000 + int(message.nanos) // 1_000_000


def _policies(message: ppb.Policies) -> Policies:
    """The domain form of stored policies, as they are: the service validated them when written."""
    threshold = None
    if message.HasField("approval_required_threshold_cents"):
        threshold = message.approval_required_threshold_cents
    return Policies(
        approved_models=tuple(message.approved_models),
        banned_patterns=tuple(BannedPattern(b.id, b.pattern) for b in message.banned_patterns),
        key_environment_check=tuple(
            KeyRule(r.key_fingerprint, r.key_label, tuple(r.environments))
            for r in message.key_environment_check
        ),
        approval_required_threshold_cents=threshold,
        journal_prompts=message.journal_prompts,
    )


def _policy_view(message: ppb.PolicySet) -> PolicyView:
    return PolicyView(
        policies=policies_to_dict(_policies(message.policies)) if message.version else {},
        version=message.version,
        etag=message.etag,
        updated_by=message.updated_by,
        update_time=_time(message.update_time) if message.version else None,
    )


def _violation(message: vpb.Violation) -> Violation:
    """The domain form of a violation; its pattern hit carries no matched text (the wire has none)."""
    try:
        policy_type = PolicyType(message.policy_type)
    except ValueError:
        raise BackendError(
            f"the service reported a violation of policy type {message.policy_type}, which this console "
            "does not know: upgrade the console"
        ) from None
    pattern = None
    if message.HasField("pattern"):
        p = message.pattern
        pattern = PatternHit(p.pattern_id, p.pattern, p.offset, p.redacted_excerpt, p.matched_on_client)
    return Violation(
        violation_id=message.violation_id,
        policy_type=policy_type,
        message=message.message,
        call_time_ms=_ms(message.call_time),
        decision_id=message.decision_id,
        session_id=message.session_id,
        project=message.project,
        requested_model=message.requested_model,
        effective_model=message.effective_model,
        environment=message.environment,
        key_fingerprint=message.key_fingerprint,
        key_label=message.key_label,
        cost_nano_usd=message.cost_nano_usd,
        policy_version=message.policy_version,
        pattern=pattern,
        approved_models=tuple(message.approved_models),
        permitted_environments=tuple(message.permitted_environments),
        threshold_cents=message.threshold_cents,
        cursor=message.cursor,
    )


def _session(message: spb.SessionSummary) -> SessionSummary:
    blocked: dict[Rule, int] = {}
    for count in message.blocked:
        if count.rule in Rule._value2member_map_:
            blocked[Rule(count.rule)] = count.count
    return SessionSummary(
        session_id=message.session_id,
        project=message.project,
        spend_nano_usd=message.spend_nano_usd,
        budget_nano_usd=message.budget_nano_usd if message.HasField("budget_nano_usd") else None,
        decisions=message.decision_count,
        blocked=blocked,
        last_seen_ms=_ms(message.last_seen_time),
    )


def _filter_fields(where: ViolationFilter) -> dict[str, Any]:
    return {
        "policy_type": int(where.policy_type) if where.policy_type else 0,
        "session_id": where.session_id,
        "project": where.project,
    }


def _field_violations(error: grpc.aio.AioRpcError) -> list[FieldViolation]:
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
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return NotAuthorized(details)
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return NotAuthorized(details, wrong_scope=True)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(details, _field_violations(error))
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        return EditConflict(details)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return BackendUnavailable("it did not answer in time")
    if code is grpc.StatusCode.UNAVAILABLE:
        # gRPC's details end with the cause ("…: Connection refused"); the rest is transport detail.
        return BackendUnavailable(details.rsplit(": ", 1)[-1].strip().lower() or "unavailable")
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
        clock: Callable[[], float] = time.monotonic,
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
        self._feed = violation_pb2_grpc.ViolationServiceStub(self._channel)
        self._sessions = session_pb2_grpc.SessionServiceStub(self._channel)
        self._timeout = timeout_seconds
        self._clock = clock
        self._open_mode: tuple[float, bool] | None = None  # (when asked, the answer)

    def _metadata(self, api_key: str) -> tuple[tuple[str, str], ...]:
        # No key at all in open development mode (a service without keys needs none).
        return (("authorization", f"Bearer {api_key}"),) if api_key else ()

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

    async def open_mode(self) -> bool:
        """Ask an admin-only read with no key at all: only a server without keys answers it.

        The answer is kept for ``OPEN_MODE_TTL_SECONDS``: on a server with keys every probe
        counts as a refused call (``spendgate_auth_failures_total{reason="missing"}``), so
        a busy sign-in page must not probe on every view.
        """
        now = self._clock()
        if self._open_mode is not None and now - self._open_mode[0] < OPEN_MODE_TTL_SECONDS:
            return self._open_mode[1]
        try:
            await self._policies.GetPolicies(ppb.GetPoliciesRequest(), timeout=self._timeout)
            is_open = True
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED):
                raise _translate(exc) from exc
            is_open = False
        self._open_mode = (now, is_open)
        return is_open

    async def get_config(self, api_key: str, project: str) -> ConfigView:
        """The current config of the tenant (project '') or of a project."""
        response = await self._call(self._stub.GetConfig, cpb.GetConfigRequest(project=project), api_key)
        return _view(response.config)

    async def update_config(
        self, api_key: str, project: str, config: EnforcementConfig, etag: str
    ) -> ConfigView:
        """Compare-and-set: EditConflict when ``etag`` is stale, InvalidInput when refused."""
        request = cpb.UpdateConfigRequest(
            project=project, enforcement_config=config_to_proto(config), etag=etag
        )
        return _view((await self._call(self._stub.UpdateConfig, request, api_key)).config)

    async def list_revisions(
        self, api_key: str, project: str, page_size: int, page_token: str
    ) -> RevisionPage:
        """One page of history, plus the revision before its last one (to diff that one too)."""
        revisions, token, older = await self._revision_page(
            self._stub.ListConfigRevisions,
            lambda size, token: cpb.ListConfigRevisionsRequest(
                project=project, page_size=size, page_token=token
            ),
            api_key,
            page_size,
            page_token,
        )
        return RevisionPage(
            tuple(_view(r) for r in revisions), token, None if older is None else _view(older)
        )

    async def get_policies(self, api_key: str) -> PolicyView:
        """The tenant's current policies."""
        response = await self._call(self._policies.GetPolicies, ppb.GetPoliciesRequest(), api_key)
        return _policy_view(response.policy_set)

    async def update_policies(self, api_key: str, policies: Policies, etag: str) -> PolicyView:
        """Compare-and-set: EditConflict on a stale ``etag``, InvalidInput (RE2's reasons too) if refused."""
        request = ppb.UpdatePoliciesRequest(policies=policies_to_proto(policies), etag=etag)
        return _policy_view((await self._call(self._policies.UpdatePolicies, request, api_key)).policy_set)

    async def list_policy_revisions(
        self, api_key: str, page_size: int, page_token: str
    ) -> PolicyRevisionPage:
        """One page of policy history, plus the revision before its last one (to diff that one too)."""
        revisions, token, older = await self._revision_page(
            self._policies.ListPolicyRevisions,
            lambda size, token: ppb.ListPolicyRevisionsRequest(page_size=size, page_token=token),
            api_key,
            page_size,
            page_token,
        )
        views = tuple(_policy_view(r) for r in revisions)
        return PolicyRevisionPage(views, token, None if older is None else _policy_view(older))

    async def _call(self, method: Any, request: Any, api_key: str) -> Any:
        """One unary call with the console's deadline and the caller's key; errors translated."""
        try:
            return await method(request, timeout=self._timeout, metadata=self._metadata(api_key))
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from exc

    async def _revision_page(
        self, method: Any, request: Callable[[int, str], Any], api_key: str, page_size: int, page_token: str
    ) -> tuple[Sequence[Any], str, Any]:
        """A List*Revisions page: its revisions, next token, and the revision before its last (or None)."""
        page = await self._call(method, request(page_size, page_token), api_key)
        older = None
        if page.next_page_token:
            after = await self._call(method, request(1, page.next_page_token), api_key)
            older = after.revisions[0] if after.revisions else None
        return page.revisions, page.next_page_token, older

    async def list_violations(
        self, api_key: str, where: ViolationFilter, page_size: int, page_token: str, *, since_ms: int = 0
    ) -> ViolationPage:
        """One page of the violations ``where`` admits (found at ``since_ms`` or later), newest first."""
        request = vpb.ListViolationsRequest(
            page_size=page_size, page_token=page_token, **_filter_fields(where)
        )
        if since_ms:
            request.start_time.CopyFrom(timestamp(since_ms))
        try:
            response = await self._feed.ListViolations(
                request, timeout=self._timeout, metadata=self._metadata(api_key)
            )
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from exc
        return ViolationPage(tuple(_violation(v) for v in response.violations), response.next_page_token)

    async def watch_violations(
        self, api_key: str, where: ViolationFilter, cursor: str
    ) -> AsyncGenerator[Violation, None]:
        """WatchViolations from ``cursor``: no deadline (it is live); the call ends when the iterator does."""
        request = vpb.WatchViolationsRequest(cursor=cursor, **_filter_fields(where))
        call = self._feed.WatchViolations(request, metadata=self._metadata(api_key))
        try:
            async for response in call:
                yield _violation(response.violation)
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from exc
        finally:
            call.cancel()

    async def list_sessions(self, api_key: str, project: str, page_size: int) -> tuple[SessionSummary, ...]:
        """The sessions (of ``project`` when given) with the most spend, highest first."""
        try:
            response = await self._sessions.ListSessions(
                spb.ListSessionsRequest(project=project, page_size=page_size),
                timeout=self._timeout,
                metadata=self._metadata(api_key),
            )
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from exc
        return tuple(_session(s) for s in response.sessions)

    async def get_session_spend(self, api_key: str, session_id: str) -> tuple[SpendPoint, ...]:
        """One session's settled spend per minute over the last 24 hours, oldest first."""
        try:
            response = await self._sessions.GetSessionSpend(
                spb.GetSessionSpendRequest(session_id=session_id),
                timeout=self._timeout,
                metadata=self._metadata(api_key),
            )
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from exc
        return tuple(SpendPoint(_ms(p.minute_start_time), p.cost_nano_usd) for p in response.points)

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()
