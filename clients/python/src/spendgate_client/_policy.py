"""What the wrappers tell the journal about a call, and local banned-pattern matching.

Privacy: by default the prompt never leaves the process. The client fetches the
tenant's banned patterns (``PolicyService.GetPatternSet``, cached by version and
re-checked every :data:`PATTERN_REFRESH_SECONDS`), matches them here, and reports
only which patterns matched and where. Only when the tenant turned on prompt
journaling is the prompt text sent with Settle (at most
:data:`MAX_PROMPT_TEXT_BYTES`; when it had to be cut, the client also matches
locally so that nothing past the cut goes unchecked).

Matching uses RE2 (the ``re2`` extra: ``pip install google-re2``, the google-re2
package), which runs in time linear in the prompt whatever the pattern. Without
it the client does **not** fall back to Python's ``re``: a pattern like
``(a+)+$`` can take exponential time there and would stall the caller's
settle thread. It logs a warning once and reports no matches; the prompts of
that client are then checked only if the tenant journals prompts.

Matching and the pattern fetch run on the settle thread, after the provider
answered: they never delay a call.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
from spendgate.v1 import policy_pb2 as ppb
from spendgate.v1 import policy_pb2_grpc

from spendgate_client._client import DecisionClient, JournalContext
from spendgate_client._install import extra_requirement

try:
    import re2  # type: ignore[import-untyped]  # google-re2 ships no type information
except ImportError:  # pragma: no cover - exercised by deployments without the extra
    re2 = None

__all__ = [
    "MAX_PROMPT_TEXT_BYTES",
    "PATTERN_REFRESH_SECONDS",
    "CallJournal",
    "JournalSettings",
    "PatternMatcher",
    "key_fingerprint",
    "prompt_text",
]

_log = logging.getLogger("spendgate_client")

# The server's bound on SettleRequest.prompt_text.
MAX_PROMPT_TEXT_BYTES = 32 * 1024
PATTERN_REFRESH_SECONDS = 30.0
# Keys of request bodies (Anthropic Messages, OpenAI Chat and Responses) that hold prompt text.
_TEXT_KEYS = ("system", "instructions", "messages", "input", "content", "text", "output")


def key_fingerprint(api_key: str) -> str:
    """The fingerprint of a provider API key: 32 hex digits of a salted SHA-256.

    This is what the journal and ``key_environment_check`` policies see; the key
    itself never leaves the process. ``spendgate policies fingerprint`` computes
    the same value from a key on stdin.
    """
    return hashlib.sha256(b"spendgate-provider-key-v1\x00" + api_key.encode()).hexdigest()[:32]


def prompt_text(body: Mapping[str, Any]) -> str:
    """The text of a request body (system, instructions, messages, input), one part per line.

    Media (images, documents by value) is skipped: only text is matched or journaled.
    """
    parts: list[str] = []

    def visit(value: Any) -> None:
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, Mapping):
            for key in _TEXT_KEYS:
                if key in value:
                    visit(value[key])
        elif isinstance(value, list | tuple):
            for item in value:
                visit(item)
        else:
            dump = getattr(value, "model_dump", None)
            if dump is not None:
                visit(dump(mode="json", exclude_unset=True))

    for key in ("system", "instructions", "messages", "input"):
        if key in body:
            visit(body[key])
    return "\n".join(parts)


def _truncate_utf8(text: str, limit: int) -> tuple[str, bool]:
    raw = text.encode()
    if len(raw) <= limit:
        return text, False
    return raw[:limit].decode(errors="ignore"), True


class PatternMatcher:
    """The tenant's banned patterns, fetched through ``client``'s channel and cached by version.

    Args:
        client: the blocking client whose channel, key and deadline are used.
        refresh_seconds: how often the cached set is re-checked (a cheap call when unchanged).
        clock: monotonic seconds.
    """

    def __init__(
        self,
        client: DecisionClient,
        *,
        refresh_seconds: float = PATTERN_REFRESH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._refresh = refresh_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._stub = policy_pb2_grpc.PolicyServiceStub(client._channel)  # one channel per client
        self.version: int | None = None
        self._patterns: list[tuple[str, Any]] = []
        self._pattern_count = 0
        self.journal_prompts = False
        self._checked_at = -float("inf")
        self._warned: set[str] = set()

    def wants_text(self) -> bool:
        """Whether calls should keep their prompt text for the settle (unknown set: yes)."""
        return self.version is None or self._pattern_count > 0 or self.journal_prompts

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            _log.warning(message, *args)

    def refresh(self) -> None:
        """Fetch the pattern set if it was never fetched or the refresh period passed."""
        now = self._clock()
        if now - self._checked_at < self._refresh:
            return
        self._checked_at = now
        try:
            response = self._stub.GetPatternSet(
                ppb.GetPatternSetRequest(known_version=self.version or 0),
                timeout=self._client.timeout * 4,
                metadata=self._client._metadata,  # the client's API key
            )
        except grpc.RpcError as error:
            self._warn_once(
                "fetch",
                "spendgate: cannot fetch the banned-pattern set (%s); prompts are not matched locally",
                error.code().name,
            )
            return
        if response.unchanged:
            return
        compiled: list[tuple[str, Any]] = []
        if re2 is not None:
            options = re2.Options()
            options.log_errors = False
            for banned in response.patterns:
                try:
                    compiled.append((banned.id, re2.compile(banned.pattern, options)))
                except re2.error:
                    self._warn_once(banned.id, "spendgate: pattern %s does not compile; skipped", banned.id)
        elif response.patterns and not response.journal_prompts:
            self._warn_once(
                "re2",
                "spendgate: google-re2 is not installed, so the %d banned patterns are not matched on this "
                "client and its prompts go unchecked (pip install '%s')",
                len(response.patterns),
                extra_requirement("re2"),
            )
        self._patterns = compiled
        self._pattern_count = len(response.patterns)
        self.journal_prompts = response.journal_prompts
        self.version = response.version

    def annotate(self, context: JournalContext, text: str) -> JournalContext:
        """``context`` with the prompt's matches (by id and offset) and, when journaled, its text."""
        with self._lock:
            self.refresh()
            if self.version is None:
                return context
            truncated = False
            if self.journal_prompts:
                sent, truncated = _truncate_utf8(text, MAX_PROMPT_TEXT_BYTES)
                context = replace(context, prompt_text=sent, prompt_truncated=truncated)
            if self._patterns and (truncated or not self.journal_prompts):
                matches = []
                for pattern_id, program in self._patterns:
                    found = program.search(text)
                    if found is not None:
                        matches.append((pattern_id, found.start()))
                context = replace(context, pattern_set_version=self.version, pattern_matches=tuple(matches))
            return context


@dataclass
class JournalSettings:
    """Per-wrapper journal context: where it runs, and its pattern matcher."""

    environment: str = field(default_factory=lambda: os.environ.get("SPENDGATE_ENVIRONMENT", ""))
    project: str = field(default_factory=lambda: os.environ.get("SPENDGATE_PROJECT", ""))
    key_label: str = field(default_factory=lambda: os.environ.get("SPENDGATE_KEY_LABEL", ""))
    matcher: PatternMatcher | None = None
    _fingerprints: dict[str, str] = field(default_factory=dict)

    def fingerprint(self, api_key: str | None) -> str:
        """The key's fingerprint, memoized (a wrapper uses one key, or a few via with_options)."""
        if not api_key:
            return ""
        found = self._fingerprints.get(api_key)
        if found is None:
            if len(self._fingerprints) > 16:
                self._fingerprints.clear()
            found = self._fingerprints[api_key] = key_fingerprint(api_key)
        return found


@dataclass
class CallJournal:
    """One call's journal context; computed once, on the settle thread."""

    settings: JournalSettings
    requested_model: str
    verdict: str
    key_fingerprint: str
    text: str | None
    _context: JournalContext | None = None

    def context(self) -> JournalContext:
        """What this call's Settle tells the journal (the prompt matched on first use)."""
        if self._context is None:
            s = self.settings
            context = JournalContext(
                requested_model=self.requested_model,
                verdict=self.verdict,
                project=s.project,
                key_fingerprint=self.key_fingerprint,
                key_label=s.key_label,
                environment=s.environment,
            )
            if self.text is not None and s.matcher is not None:
                context = s.matcher.annotate(context, self.text)
            self._context = context
        return self._context
